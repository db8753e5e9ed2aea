"""Every served family through the real workers: a tiny synthetic model of it (homelab_disagg.synth), the
prefill worker's torch KV injected into the decode worker's llama.cpp, greedy tokens equal to llama.cpp alone."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]
PROMPT = "The capital of France is a city with a long history of art, food and science, and"


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_lab(request, tmp_path_factory):
    from coordinator.launcher import LocalLab
    from homelab_disagg.synth import SynthSpec, cached_synth

    local = LocalLab(cached_synth(SynthSpec(request.param)), prefill_args=["--device", "cpu"],
                     log_dir=tmp_path_factory.mktemp("logs"))
    cfg = local.start()
    yield cfg
    local.stop()


def generate(lab, arch: str, **req) -> list[int]:
    from coordinator.core import Coordinator, GenerationRequest
    from coordinator.records import RequestRecord

    async def go():
        coord = Coordinator(lab)
        await coord.start()
        try:
            return [ev.token_id async for ev in coord.generate(GenerationRequest(architecture=arch, **req),
                                                                RequestRecord("", arch))]
        finally:
            await coord.close()

    return asyncio.run(go())


def test_disaggregated_greedy_equals_llama_cpp_alone(family_lab):
    from wire.messages import Sampling

    s = Sampling(max_tokens=8, ignore_eos=True)
    got = generate(family_lab, "disaggregated", prompt=PROMPT, sampling=s)
    assert len(set(got)) > 1  # a model that repeats one token would agree whatever the KV
    assert got == generate(family_lab, "colocated-cpu", prompt=PROMPT, sampling=s)
