#!/usr/bin/env bash
# Every experiment in the order the decision model wants them (calibration right before what it
# predicts: the box's speed drifts), then plan vs measured. Usage: experiments/run_all.sh OUT_DIR [--quick]
# Needs root for the link lab (exp2); without it exp2 measures loopback only.
set -euo pipefail
out=${1:?usage: experiments/run_all.sh OUT_DIR [--quick]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
cd "$here"
for exp in exp5_ttft_anatomy exp4_decode_scaling exp1_architectures exp3_codecs exp2_transfer; do
    echo "== $exp $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$py" -m "experiments.$exp" --out "$out" "$@" 2>&1 | tee "$out/$exp.log"
done
"$py" -m experiments.plan_vs_measured --results "$out" | tee "$out/plan_vs_measured.log"
