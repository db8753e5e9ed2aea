"""wire.native: the C kernels (kivi4 payloads into f16 and q8_0 cache rows; f16 byte planes) give the numpy path's
bytes."""

from __future__ import annotations

import importlib.util
import shutil
import sysconfig

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from wire import codecs, lossless, native
from tests.wire.test_codecs import PROPS, kv_like

F32 = np.float32
HAS_COMPILER = bool(shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]))
needs_kernel = pytest.mark.skipif(not native.available(), reason="wire/_native.c was not built (no C compiler), or "
                                  "this CPU lacks AVX2/F16C and the codecs keep numpy")


def numpy_path(payload: bytes, t: int, c: int, role: str, head_dim: int, cache_type: str = "q8_0") -> bytes:
    x = codecs.kivi4_dequantize(payload, t, c, role)
    if cache_type == "f16":
        return x.astype("<f2").tobytes()
    return codecs.quantize_rows(x, "q8_0", role, head_dim).tobytes()


def kernel(payload: bytes, t: int, c: int, role: str, head_dim: int, cache_type: str = "q8_0") -> bytes:
    if cache_type == "f16":
        return native.kivi4_to_f16(payload, t, c, role).tobytes()
    return native.kivi4_to_q8_0(payload, t, c, role, codecs.hadamard_size(role, head_dim)).tobytes()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this box, so pip could not build wire/_native.c")
def test_the_kernels_are_built_where_a_compiler_is():
    assert importlib.util.find_spec("wire._native") is not None


@needs_kernel
@PROPS
@given(st.data(), st.sampled_from(["k", "v"]), st.sampled_from([64, 128, 96, 32]), st.sampled_from(["q8_0", "f16"]))
def test_kernels_are_the_numpy_path_byte_for_byte(data, role, head_dim, cache_type):
    """head_dim 128: K rotates in runs of 128; 96 and 32: no rotation (head_dim % 64 != 0)."""
    t = data.draw(st.integers(1, 80))
    c = data.draw(st.sampled_from([64, 192, 256, 384]))
    assume(c % head_dim == 0)
    x = kv_like(data.draw, (t, c))
    p = bytes(codecs.kivi4_encode(x, role, head_dim))
    assert kernel(p, t, c, role, head_dim, cache_type) == numpy_path(p, t, c, role, head_dim, cache_type)


@needs_kernel
@pytest.mark.parametrize("cache_type", ["q8_0", "f16"])
@pytest.mark.parametrize("role", ["k", "v"])
def test_kernels_on_a_long_prompt_with_outliers_zeros_and_flat_groups(role, cache_type):
    rng = np.random.default_rng(11)
    t, c = 1030, 192  # K's last group holds 38 tokens
    x = rng.standard_normal((t, c)).astype(F32) * rng.choice([1e-3, 1.0, 40.0], (1, c)).astype(F32)
    x[:, 5] = 0.0  # a channel of zeros: K's scale 0
    x[100:140] = 2.5  # flat tokens: V's scale 0
    x = x.astype(np.float16).astype(F32)
    p = bytes(codecs.kivi4_encode(x, role, 64))
    got = kernel(p, t, c, role, 64, cache_type)
    assert got == numpy_path(p, t, c, role, 64, cache_type)
    assert bytes(codecs.get_codec("kivi4").decode(memoryview(p), t, c, cache_type, role, 64)) == got


@pytest.mark.parametrize("cache_type", ["q8_0", "f16"])
def test_without_the_kernels_the_codec_takes_the_numpy_path(monkeypatch, cache_type):
    x = np.random.default_rng(5).standard_normal((70, 192)).astype(F32)
    p = bytes(codecs.kivi4_encode(x, "k", 64))
    monkeypatch.setattr(native, "_library", lambda: None)
    assert native.kivi4_to_q8_0(p, 70, 192, "k", 64) is None and native.kivi4_to_f16(p, 70, 192, "k") is None
    got = bytes(codecs.get_codec("kivi4").decode(memoryview(p), 70, 192, cache_type, "k", 64))
    assert got == numpy_path(p, 70, 192, "k", 64, cache_type)


@needs_kernel
def test_runs_longer_than_the_kernel_holds_fall_back_to_numpy():
    x = np.random.default_rng(6).standard_normal((40, 1024)).astype(F32)
    p = bytes(codecs.kivi4_encode(x, "k", 1024))
    assert codecs.hadamard_size("k", 1024) == 1024 > native.MAX_RUN
    assert native.kivi4_to_q8_0(p, 40, 1024, "k", 1024) is None
    got = bytes(codecs.get_codec("kivi4").decode(memoryview(p), 40, 1024, "q8_0", "k", 1024))
    assert got == numpy_path(p, 40, 1024, "k", 1024)


@needs_kernel
def test_arguments_the_kernel_cannot_take_are_an_error_not_a_crash():
    x = np.random.default_rng(7).standard_normal((8, 96)).astype(F32)
    p = bytes(codecs.kivi4_encode(x, "k", 96))
    with pytest.raises(ValueError, match="refused 8 x 96 with runs of 64"):
        native.kivi4_to_q8_0(p, 8, 96, "k", 64)  # a row of 96 is not whole runs of 64
    with pytest.raises(ValueError, match="refused 0 x 96"):
        native.kivi4_to_f16(b"", 0, 96, "v")


@needs_kernel
@PROPS
@given(st.integers(0, 3000), st.integers(0, 2**32 - 1))
def test_byte_planes_split_and_join_as_numpy(n, seed):
    f16s = np.random.default_rng(seed).integers(0, 1 << 16, n, dtype=np.uint16).view("<f2")
    hi, lo = np.empty(n, np.uint8), np.empty(n, np.uint8)
    assert native.f16_split_planes(f16s, hi, lo)
    assert np.array_equal(hi, f16s.view(np.uint16) >> 8) and np.array_equal(lo, f16s.view(np.uint16) & 0xFF)
    back = np.empty(n, "<f2")
    assert native.f16_join_planes(hi, lo, back)
    assert back.tobytes() == f16s.tobytes()


def test_without_the_kernels_the_lossless_codec_keeps_its_bytes(monkeypatch):
    x = np.random.default_rng(8).standard_normal((300, 192)).astype(np.float16)
    with_kernels = lossless.encode_bp_zstd(x).tobytes()
    monkeypatch.setattr(native, "_library", lambda: None)
    assert lossless.encode_bp_zstd(x).tobytes() == with_kernels
    assert lossless.decode_bp_zstd(with_kernels, x.size).tobytes() == x.tobytes()
