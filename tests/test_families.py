"""The table of families and what the model reader takes from it: pure data and GGUF headers, no engine."""

from __future__ import annotations

import pytest

from homelab_disagg.errors import ModelError
from homelab_disagg.families import FAMILIES, Family, refusal


def test_every_family_states_its_handoff_facts():
    assert set(FAMILIES) == {"llama", "qwen2", "qwen3", "gemma3"}
    assert FAMILIES["llama"].rope_layout == "norm"
    assert {f.rope_layout for name, f in FAMILIES.items() if name != "llama"} == {"neox"}
    assert FAMILIES["qwen2"].attention_bias and FAMILIES["qwen3"].qk_norm and FAMILIES["gemma3"].qk_norm
    assert FAMILIES["gemma3"].caches == "iswa" and FAMILIES["gemma3"].embedding_scale
    assert [i for i in range(12) if not FAMILIES["gemma3"].is_sliding(i)] == [5, 11]  # llama.cpp's pattern of 6
    assert not any(FAMILIES["llama"].is_sliding(i) for i in range(12))


def test_a_family_that_contradicts_itself_is_refused():
    with pytest.raises(ValueError, match="norm or neox"):
        Family("x", "rotate", "single", False, False, False, 0, False, "")
    with pytest.raises(ValueError, match="sliding-window pattern"):
        Family("x", "neox", "iswa", False, False, False, 0, False, "")


def test_refusals_name_the_architecture_and_what_to_do():
    assert "qwen3moe" in refusal("qwen3moe") and "dense" in refusal("qwen3moe")
    assert "gemma2" in refusal("gemma2") and "gemma3" in refusal("gemma2")
    msg = refusal("rwkv7")
    assert "'rwkv7'" in msg and "llama, qwen2, qwen3, gemma3" in msg


def _gguf(path, arch: str, **kv):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    for key, value in kv.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_and_self_contradicting_models_are_refused_by_name(tmp_path):
    from homelab_disagg.model import read_model_info

    with pytest.raises(ModelError, match="'gemma2' is not supported.*softcapping"):
        read_model_info(_gguf(tmp_path / "g2.gguf", "gemma2"))
    with pytest.raises(ModelError, match="biases are missing"):
        read_model_info(_gguf(tmp_path / "q2.gguf", "qwen2"))
    with pytest.raises(ModelError, match="K head size 16 != V head size 32"):
        read_model_info(_gguf(tmp_path / "kv.gguf", "llama", **{"attention.key_length": 16,
                                                                "attention.value_length": 32}))
    with pytest.raises(ModelError, match="mixture-of-experts"):
        read_model_info(_gguf(tmp_path / "moe.gguf", "llama", expert_count=8))
