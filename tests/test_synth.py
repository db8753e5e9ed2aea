"""`model synth`: tiny synthetic GGUFs of every family, read by our model reader, llama.cpp and transformers."""

from __future__ import annotations

import pytest

from homelab_disagg.errors import ConfigError
from tests.conftest import needs_llama, needs_torch

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


def synth(family: str, quant: str = "F16"):
    from homelab_disagg.synth import SynthSpec, cached_synth

    return cached_synth(SynthSpec(family, "tiny", quant))


def test_bad_specs_are_refused_by_name():
    from homelab_disagg.synth import SynthSpec

    with pytest.raises(ConfigError, match="'mixtral' is not supported"):
        SynthSpec("mixtral")
    with pytest.raises(ConfigError, match="--geometry 'huge'"):
        SynthSpec("llama", "huge")
    with pytest.raises(ConfigError, match="--quant 'Q3_K'"):
        SynthSpec("llama", quant="Q3_K")


def test_llama3_rope_factors_match_the_converter():
    from homelab_disagg.synth import GEOMETRIES

    rope = GEOMETRIES["llama-3.1-8b"].llama3_rope
    f = rope.factors(128, 500000.0)
    assert f.shape == (64,) and f[0] == 1.0 and f[-1] == 8.0  # high frequencies kept, low ones divided by 8
    assert ((f[1:] - f[:-1]) >= 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_synth_model_facts(family):
    from homelab_disagg.families import FAMILIES as TABLE
    from homelab_disagg.model import read_model_info

    info = read_model_info(synth(family), require_handoff=False)
    facts = info.handoff_facts()
    assert (info.architecture, info.num_layers, info.head_dim, info.num_kv_heads) == (family, 6, 32, 2)
    assert facts["rope_layout"] == TABLE[family].rope_layout and facts["caches"] == TABLE[family].caches
    assert info.attention_bias == (family == "qwen2") and info.qk_norm == (family in ("qwen3", "gemma3"))
    assert info.rope_freqs == (family == "llama")
    assert info.sliding_layers == ((0, 1, 2, 3, 4) if family == "gemma3" else ())
    assert info.sliding_window == (32 if family == "gemma3" else 0)


def test_gemma3_is_read_but_refused_for_serving():
    from homelab_disagg.errors import ModelError
    from homelab_disagg.model import read_model_info

    with pytest.raises(ModelError, match="gemma3 family is read but not served yet"):
        read_model_info(synth("gemma3"))


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_loads_it_and_its_chat_template_works(family):
    from decode_cpu.llama import LlamaModel

    m = LlamaModel(synth(family))
    try:
        text = m.apply_chat_template([{"role": "user", "content": "hi"}])
        marker = "<start_of_turn>" if family == "gemma3" else "<|im_start|>"
        assert marker in text and "hi" in text
        ids = m.tokenize(text, add_special=False, parse_special=True)
        assert m.tokenize(marker, add_special=False, parse_special=True)[0] in ids
        assert len(m.tokenize(marker, add_special=False, parse_special=True)) == 1  # a special token, not text
    finally:
        m.close()


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_through_llama_cpp(quant):
    from decode_cpu.llama import LlamaModel
    from homelab_disagg.model import read_model_info

    path = synth("qwen2", quant)
    assert path.stat().st_size < synth("qwen2").stat().st_size
    assert read_model_info(path).architecture == "qwen2"
    LlamaModel(path).close()


@pytest.mark.slow
@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_it_as_the_torch_engine(family):
    from homelab_disagg.config import PrefillWorkerConfig
    from homelab_disagg.model import read_model_info
    from prefill_gpu.engine import TorchPrefillEngine

    info = read_model_info(synth(family), require_handoff=False)
    engine = TorchPrefillEngine(PrefillWorkerConfig(info.path, device="cpu"), info)
    attn = engine.decoder.layers[0].self_attn
    assert attn.k_proj.weight.shape == (info.num_kv_heads * info.head_dim, info.hidden_size)
    shapes = []
    engine.prefill([1, 2, 3, 4], lambda i, k, v: shapes.append(tuple(k.shape)))
    assert shapes == [(1, info.num_kv_heads, 4, info.head_dim)] * info.num_layers


def test_model_synth_and_model_info_commands(tmp_path):
    from typer.testing import CliRunner

    from homelab_disagg.cli import app

    out = tmp_path / "q3.gguf"
    done = CliRunner().invoke(app, ["model", "synth", "--family", "qwen3", "-o", str(out)])
    assert done.exit_code == 0, done.output
    done = CliRunner().invoke(app, ["model", "info", "-m", str(out)])
    assert done.exit_code == 0, done.output
    assert "qwen3" in done.output and "neox" in done.output and "qk_norm" in done.output
    done = CliRunner().invoke(app, ["model", "synth", "--family", "gemma2", "-o", str(out)])
    assert done.exit_code == 1 and "'gemma2' is not supported" in done.output
