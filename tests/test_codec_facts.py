"""Codec facts have one source, the registry in wire/codecs.py (cache types: wire/ggml.py); config, plan
and the CLI read it, so a codec registered there is accepted, sized and listed everywhere. No engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from homelab_disagg import plan
from homelab_disagg.config import DecodeWorkerConfig, LabConfig
from homelab_disagg.errors import ConfigError
from wire import codecs, ggml

SMOL = plan.PRESETS["smollm2-135m"]
NOT_CODECS = ("q4_1", "zstd", "F16", "")


def test_config_accepts_exactly_the_registered_codecs():
    accepted = [name for name in codecs.names() + NOT_CODECS if _lab_accepts(name)]
    assert accepted == list(codecs.names())
    with pytest.raises(ConfigError, match="f16\\+bp-zstd"):  # the refusal lists what is accepted
        LabConfig(codec="zstd")


def _lab_accepts(codec: str) -> bool:
    try:
        return LabConfig(codec=codec).codec == codec
    except ConfigError:
        return False


def test_decode_config_accepts_exactly_the_cache_types():
    def accepts(cache_type):
        try:
            return DecodeWorkerConfig(Path("m.gguf"), kv_cache_type=cache_type).kv_cache_type == cache_type
        except ConfigError:
            return False

    assert {t for t in (*ggml.GGML_TYPES, "bf16") if accepts(t)} == set(codecs.CACHE_TYPES)


@pytest.mark.parametrize("name", codecs.names())
def test_plan_has_a_size_and_a_cache_for_every_codec(name):
    codec = codecs.get_codec(name)
    costs = plan.Costs(plan.DEFAULT_CALIBRATION, SMOL, plan.Link(None), name)
    assert 0 < costs.wire_bytes(1000) <= plan.Costs(plan.DEFAULT_CALIBRATION, SMOL, plan.Link(None)).wire_bytes(1000)
    assert costs.cache_type in codecs.CACHE_TYPES and costs.inject(1000) > 0
    if codec.typical_bytes_per_elem is None:  # fixed size: plan's bytes are the payloads' own
        t, c = 1024, SMOL.num_kv_heads * SMOL.head_dim
        payloads = SMOL.num_layers * sum(codec.payload_bytes(t, c, role) for role in codecs.ROLES)
        assert costs.wire_bytes(t) == payloads
    else:  # variable size: a typical figure below the bound
        assert codec.typical_bytes_per_elem * 1024 * 192 < codec.payload_bytes(1024, 192, "k")


def test_plan_refuses_an_unregistered_codec_naming_the_registered_ones():
    with pytest.raises(ConfigError, match="kivi4, f16\\+bp-zstd"):
        plan.Costs(plan.DEFAULT_CALIBRATION, SMOL, plan.Link(None), "zstd")


@pytest.mark.parametrize("command, names", [(["plan"], codecs.names()), (["serve"], codecs.names()),
                                            (["decode-worker"], codecs.CACHE_TYPES)])
def test_cli_help_lists_the_registry(command, names, monkeypatch):
    from typer.testing import CliRunner

    from homelab_disagg.cli import app

    monkeypatch.setenv("COLUMNS", "400")  # one help line per option: no name split by wrapping
    out = CliRunner().invoke(app, [*command, "--help"]).output
    assert ", ".join(names) in out
