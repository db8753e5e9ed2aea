"""Shared fixtures. Engine tests use the real default model (fetched once into the user cache)."""

from __future__ import annotations

import importlib.util

import pytest


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


needs_llama = pytest.mark.skipif(not _has("llama_cpp"), reason="llama-cpp-python is not installed (the `decode` extra)")
needs_torch = pytest.mark.skipif(
    not (_has("torch") and _has("transformers")), reason="torch/transformers are not installed (the `prefill` extra)"
)


@pytest.fixture(scope="session")
def model_path():
    from homelab_disagg.model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def model_info(model_path):
    from homelab_disagg.model import read_model_info

    return read_model_info(model_path)


@pytest.fixture(scope="session")
def torch_engine(model_info):
    if not (_has("torch") and _has("transformers")):
        pytest.skip("torch/transformers are not installed (the `prefill` extra)")
    from homelab_disagg.config import PrefillWorkerConfig
    from prefill_gpu.engine import TorchPrefillEngine

    return TorchPrefillEngine(PrefillWorkerConfig(model_info.path, device="auto"), model_info)


@pytest.fixture(scope="session")
def judge(model_path):
    if not _has("llama_cpp"):
        pytest.skip("llama-cpp-python is not installed (the `decode` extra)")
    from homelab_disagg.lab.quality import LlamaJudge

    j = LlamaJudge(model_path, n_ctx=1024)
    yield j
    j.close()


@pytest.fixture(scope="session")
def quality_texts(judge):
    """8 texts of 128..512 prompt tokens plus 48 continuation tokens, tokenized by llama.cpp."""
    from homelab_disagg.workload import make_prompt

    out = []
    for i, prompt_tokens in enumerate([128, 180, 230, 280, 330, 380, 440, 512]):
        ids = judge.model.tokenize(make_prompt(prompt_tokens + 80, start=4 * i), add_special=True, parse_special=False)
        out.append((ids[: prompt_tokens + 48], prompt_tokens))
    return out


@pytest.fixture
def codec_thread_uses(monkeypatch) -> list:
    """Two CPUs for wire.two_cores, and a list that gets an entry for each hand-over to its codec threads."""
    from wire import two_cores

    monkeypatch.setattr(two_cores.os, "sched_getaffinity", lambda pid: {0, 1})
    pool, used = two_cores._pool(), []
    monkeypatch.setattr(two_cores, "_pool", lambda: used.append(1) or pool)
    return used
