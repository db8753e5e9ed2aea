"""KV codecs: golden block bytes, llama.cpp's own quantizers and Hadamard transform as the reference
(through ggml's C functions when llama-cpp-python is installed), round-trip properties of every codec,
and the torch encoders byte-identical to the numpy reference."""

from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wire import codecs, lossless
from wire.codecs import CodecError

F32 = np.float32
NAMES = ("f16", "q8_0", "q4_0", "kivi4", "f16+bp-zstd")
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encode(name, x, role="k", head_dim=64) -> bytes:
    return bytes(codecs.get_codec(name).encode(x, role, head_dim))


def decode(name, payload, t, c, cache_type, role="k", head_dim=64) -> bytes:
    return bytes(codecs.get_codec(name).decode(memoryview(payload), t, c, cache_type, role, head_dim))


def f16_rows(rows: bytes, t: int, c: int) -> np.ndarray:
    return np.frombuffer(rows, dtype="<f2").reshape(t, c).astype(F32)


# --- registry and errors -------------------------------------------------------------------------


def test_registry_ids_are_unique_and_round_trip():
    assert set(NAMES) <= set(codecs.CODECS)
    ids = [c.codec_id for c in codecs.CODECS.values()]
    assert len(ids) == len(set(ids))
    for c in codecs.CODECS.values():
        assert codecs.codec_by_id(c.codec_id) is c
    with pytest.raises(CodecError, match="unknown KV codec 'zip'"):
        codecs.get_codec("zip")
    with pytest.raises(CodecError, match="codec id 99"):
        codecs.codec_by_id(99)


def test_sizes_per_element_are_the_block_formats_and_a_typical_figure_for_the_compressor():
    sizes = {name: codecs.get_codec(name).bytes_per_elem for name in codecs.names()}
    assert sizes == {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "kivi4": 20 / 32,
                     "f16+bp-zstd": pytest.approx(2 / 1.17)}
    assert {name: codecs.get_codec(name).default_cache_type for name in codecs.names()} == {
        "f16": "f16", "q8_0": "q8_0", "q4_0": "q4_0", "kivi4": "f16", "f16+bp-zstd": "f16"}


@pytest.mark.parametrize("name", NAMES)
def test_bad_payloads_and_targets_are_named_errors(name):
    x = np.linspace(-3, 3, 4 * 64, dtype=F32).reshape(4, 64)
    p = encode(name, x)
    with pytest.raises(CodecError):
        decode(name, p[:-1], 4, 64, "f16")
    with pytest.raises(CodecError, match="cache"):
        decode(name, p, 4, 64, "q5_1")
    with pytest.raises(CodecError, match="role"):
        decode(name, p, 4, 64, "f16", role="q")


def test_converting_into_a_quantized_cache_needs_head_dim():
    p = encode("f16", np.ones((2, 64), F32))
    with pytest.raises(CodecError, match="head_dim is unknown"):
        decode("f16", p, 2, 64, "q8_0", head_dim=0)
    assert decode("f16", p, 2, 64, "f16", head_dim=0) == p  # an f16 cache never needs it


def test_rows_must_be_whole_blocks():
    with pytest.raises(CodecError, match="multiple of 32"):
        encode("q8_0", np.ones((2, 48), F32), head_dim=48)
    with pytest.raises(CodecError, match="multiple of 32"):
        encode("kivi4", np.ones((2, 48), F32))


# --- the rotation, as llama.cpp sets it up -------------------------------------------------------


def test_hadamard_sizes_follow_llama_kv_cache():
    # K: the largest power of two >= 64 dividing head_dim; V: always 64; neither unless head_dim % 64 == 0
    assert [codecs.hadamard_size("k", d) for d in (64, 128, 192, 256, 96, 80)] == [64, 128, 64, 256, 0, 0]
    assert [codecs.hadamard_size("v", d) for d in (64, 128, 256, 96)] == [64, 64, 64, 0]


@PROPS
@given(hnp.arrays(F32, st.tuples(st.integers(1, 9), st.sampled_from([64, 128, 256])),
                  elements=st.floats(-1e3, 1e3, width=32)), st.sampled_from([64, 128]))
def test_rotation_is_orthonormal_and_its_own_inverse(x, n):
    assume(x.shape[1] % n == 0)
    y = codecs.rotate(x, n)
    tol = 1e-5 * (1 + np.abs(x).max())
    assert np.allclose(np.linalg.norm(y.reshape(-1, n), axis=1), np.linalg.norm(x.reshape(-1, n), axis=1), atol=tol * n)
    assert np.allclose(codecs.rotate(y, n), x, atol=tol * 4)


def test_rotation_of_a_basis_vector_is_flat():
    e0 = np.zeros((1, 64), F32)
    e0[0, 0] = 1
    assert np.array_equal(codecs.rotate(e0, 64), np.full((1, 64), 0.125, F32))


# --- golden block layouts ------------------------------------------------------------------------


def test_q8_0_golden_block():
    x = np.arange(-16, 16, dtype=F32).reshape(1, 32)
    block = codecs.quantize_q8_0(x).tobytes()
    d = np.float32(16) / np.float32(127)
    assert len(block) == 34
    assert block[:2] == np.float16(d).tobytes()  # f16 scale first, little-endian
    q = np.frombuffer(block[2:], np.int8)
    assert q[0] == -127 and q[8] == -64 and q[16] == 0 and q[31] == 119  # -63.5 rounds to even; 119.06 -> 119
    assert block.hex() == "0830" "81899199a1a9b1b9c0c8d0d8e0e8f0f8" "000810182028303840474f575f676f77"


def test_q4_0_golden_block():
    x = np.arange(-16, 16, dtype=F32).reshape(1, 32)
    block = codecs.quantize_q4_0(x).tobytes()
    # m = -16 (largest magnitude), d = m / -8 = 2.0, q = min(15, trunc(x/2 + 8.5)); byte j = q[j] | q[j+16] << 4
    assert block[:2] == np.float16(2.0).tobytes() == bytes.fromhex("0040")
    assert block.hex() == "0040" "809191a2a2b3b3c4c4d5d5e6e6f7f7f8"
    q = np.frombuffer(block[2:], np.uint8)
    lo, hi = q & 15, q >> 4
    assert list(lo) == [int((j - 16) / 2 + 8.5) for j in range(16)]
    assert list(hi) == [min(15, int((j - 16 + 16) / 2 + 8.5)) for j in range(16)]


def test_q8_0_payload_is_rotated_as_llama_stores_it():
    # a row holding e0 in each 64-run rotates to 1/8 everywhere: every int8 is 127, d = 0.125/127
    x = np.zeros((1, 128), F32)
    x[0, [0, 64]] = 1
    rows = encode("q8_0", x, "k", 64)
    d = np.float16(np.float32(0.125) / np.float32(127)).tobytes()
    assert rows == (d + b"\x7f" * 32) * 4
    assert encode("q8_0", x, "k", 96) == codecs.quantize_q8_0(x).tobytes()  # head_dim 96: llama.cpp does not rotate


# --- llama.cpp itself as the reference (ggml's C functions) --------------------------------------

_HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None


class Ggml:
    """ggml's CPU Hadamard transform and quantizers, called on the same float32 input."""

    class _Init(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    def __init__(self):
        import llama_cpp

        lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        self.base = ctypes.CDLL(os.path.join(lib, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(os.path.join(lib, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        vp, b, c = ctypes.c_void_p, self.base, self.cpu
        b.ggml_init.restype, b.ggml_init.argtypes = vp, [self._Init]
        b.ggml_free.argtypes = [vp]
        b.ggml_new_tensor_2d.restype = vp
        b.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        b.ggml_mul_mat.restype, b.ggml_mul_mat.argtypes = vp, [vp, vp, vp]
        b.ggml_mul_mat_set_hint.argtypes = [vp, ctypes.c_int]
        b.ggml_new_graph.restype, b.ggml_new_graph.argtypes = vp, [vp]
        b.ggml_build_forward_expand.argtypes = [vp, vp]
        b.ggml_get_data.restype, b.ggml_get_data.argtypes = vp, [vp]
        c.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
        for f in (c.quantize_row_q8_0, b.quantize_row_q8_0_ref, b.quantize_row_q4_0_ref):
            f.argtypes = [vp, vp, ctypes.c_int64]

    def hadamard(self, x: np.ndarray, n: int) -> np.ndarray:
        """llama_mul_mat_hadamard: mul_mat(rot, x) hinted as Hadamard, which the CPU backend computes
        as ggml_compute_forward_fwht."""
        x = np.ascontiguousarray(x, dtype=F32)
        ctx = self.base.ggml_init(self._Init(3 * x.nbytes + 4 * n * n + (1 << 20), None, False))
        try:
            rot = self.base.ggml_new_tensor_2d(ctx, 0, n, n)  # GGML_TYPE_F32; never read by the fwht path
            src = self.base.ggml_new_tensor_2d(ctx, 0, n, x.size // n)
            ctypes.memmove(self.base.ggml_get_data(src), x.ctypes.data, x.nbytes)
            out = self.base.ggml_mul_mat(ctx, rot, src)
            self.base.ggml_mul_mat_set_hint(out, 1)  # GGML_HINT_SRC0_IS_HADAMARD
            graph = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(graph, out)
            self.cpu.ggml_graph_compute_with_ctx(ctx, graph, 1)
            res = np.empty_like(x)
            ctypes.memmove(res.ctypes.data, self.base.ggml_get_data(out), x.nbytes)
            return res
        finally:
            self.base.ggml_free(ctx)

    def quantize(self, fn, x: np.ndarray, block_bytes: int) -> bytes:
        x = np.ascontiguousarray(x, dtype=F32)
        out = np.empty(x.size // 32 * block_bytes, np.uint8)
        fn(x.ctypes.data, out.ctypes.data, x.size)
        return out.tobytes()


@pytest.fixture(scope="module")
def ggml():
    if not _HAS_LLAMA:
        pytest.skip("llama-cpp-python is not installed (the `decode` extra): no ggml reference")
    return Ggml()


def _hard_rows(rng) -> np.ndarray:
    """[12, 256] float32: ordinary KV-like rows and the blocks quantizers get wrong: all zero, -0.0,
    +a and -a tied for the largest magnitude, f16-range extremes, tiny values, exact .5 ties."""
    x = (rng.standard_normal((12, 256)) * rng.uniform(0.01, 30, 256)).astype(F32)
    x[0, :32] = 0
    x[0, 32:64] = -0.0
    x[0, 64] = -0.0
    x[1, :32] = np.where(np.arange(32) % 2, 3.0, -3.0)  # ties, negative first
    x[1, 32:64] = np.where(np.arange(32) % 2, -3.0, 3.0)  # ties, positive first
    x[2, :32] = np.linspace(-65504, 65504, 32)
    x[2, 32:64] = rng.standard_normal(32) * 1e-6
    x[3, :32] = np.arange(32) - 15.5  # x * 127/amax lands on .5 often
    x[3, 32:64] = np.arange(32) * 0.5
    return x


def test_our_rotation_is_ggml_fwht_bit_for_bit(ggml):
    x = _hard_rows(np.random.default_rng(0))
    for n in (64, 128, 256):
        assert np.array_equal(codecs.rotate(x, n).view(np.uint32), ggml.hadamard(x, n).view(np.uint32))


def test_our_q8_0_and_q4_0_are_ggml_quantizers_byte_for_byte(ggml):
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = _hard_rows(rng)
        # q8_0: what the CPU backend stores into a q8_0 cache (ggml-cpu quantize_row_q8_0)
        assert codecs.quantize_q8_0(x).tobytes() == ggml.quantize(ggml.cpu.quantize_row_q8_0, x, 34)
        assert codecs.quantize_q4_0(x).tobytes() == ggml.quantize(ggml.base.quantize_row_q4_0_ref, x, 18)
    # the reference quantizer (1/d, round half away from zero) differs only in rare last-bit cases
    x = (rng.standard_normal((256, 256)) * 5).astype(F32)
    ref = np.frombuffer(ggml.quantize(ggml.base.quantize_row_q8_0_ref, x, 34), np.uint8)
    assert (codecs.quantize_q8_0(x).reshape(-1) == ref).mean() > 0.999


def test_q8_0_codec_is_ggml_rotate_then_quantize(ggml):
    x = _hard_rows(np.random.default_rng(2))[:, :192]
    for role, n in (("k", 64), ("v", 64)):
        want = ggml.quantize(ggml.cpu.quantize_row_q8_0, ggml.hadamard(x, n), 34)
        assert encode("q8_0", x, role, 64) == want
        want4 = ggml.quantize(ggml.base.quantize_row_q4_0_ref, ggml.hadamard(x, n), 18)
        assert encode("q4_0", x, role, 64) == want4


# --- round-trip properties -----------------------------------------------------------------------

ROWS = st.tuples(st.integers(1, 80), st.sampled_from([64, 192]))


def kv_like(draw, shape, max_abs=60000.0):
    """Rows with per-channel scales (outlier channels, as real keys have) and some exact zeros."""
    t, c = shape
    base = draw(hnp.arrays(F32, shape, elements=st.floats(-1, 1, width=32)))
    scales = draw(hnp.arrays(F32, (c,), elements=st.sampled_from([0.0, 1e-3, 0.1, 1.0, 7.0, 300.0, max_abs])))
    return (base * scales).astype(np.float16).astype(F32)  # the wire starts from f16-representable values


@st.composite
def kv_rows(draw, max_abs=60000.0):
    return kv_like(draw, draw(ROWS), max_abs)


@PROPS
@given(kv_rows(), st.sampled_from(["k", "v"]))
def test_f16_and_bp_zstd_are_exact(x, role):
    t, c = x.shape
    for name in ("f16", "f16+bp-zstd"):
        p = encode(name, x, role)
        assert len(p) <= codecs.get_codec(name).payload_bytes(t, c, role)
        assert np.array_equal(f16_rows(decode(name, p, t, c, "f16", role), t, c), x)


def _block_bound_q8_0(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 32)
    d = np.abs(b).max(1) / F32(127)
    d16 = d.astype(np.float16).astype(F32)
    return np.repeat(d / 2 + 127 * np.abs(d16 - d) + 1e-6 * d, 32).reshape(x.shape)


@PROPS
@given(kv_rows())
def test_q8_0_error_is_half_a_step_per_block(x):
    t, c = x.shape
    rows = codecs.quantize_q8_0(x)
    got = codecs.dequantize_rows(rows, t, c, "q8_0", "k", 32)  # head_dim 32: no rotation
    assert (np.abs(got - x) <= _block_bound_q8_0(x)).all()


@PROPS
@given(kv_rows())
def test_q4_0_error_is_one_step_per_block(x):
    t, c = x.shape
    got = codecs.dequantize_rows(codecs.quantize_q4_0(x), t, c, "q4_0", "k", 32)
    b = x.reshape(-1, 32)
    m = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)[:, 0]
    d = np.abs(m / F32(-8))
    d16 = d.astype(np.float16).astype(F32)
    # half a step, a whole one for the value opposite the largest (its q clamps from 16 to 15)
    bound = np.repeat(d + 8 * np.abs(d16 - d) + 1e-6 * d, 32).reshape(x.shape)
    assert (np.abs(got - x) <= bound).all()


@PROPS
@given(kv_rows(max_abs=4000.0), st.sampled_from(["k", "v"]), st.sampled_from(["q8_0", "q4_0"]))
def test_rotated_codecs_round_trip_within_the_rotated_bound(x, role, name):
    """Errors are bounded per block in the rotated basis; rotating back preserves each run's L2 norm.
    (Rotation gathers up to 8x a run's largest value into one element: values near the f16 limit
    overflow after a q4_0 round trip, as they would in llama.cpp's own cache. KV stays far below.)"""
    t, c = x.shape
    got = f16_rows(decode(name, encode(name, x, role), t, c, "f16", role), t, c)
    blocks = codecs.rotate(x, 64).reshape(-1, 32)
    if name == "q8_0":
        d, half_steps, q_max = np.abs(blocks).max(1) / F32(127), 0.5, 127
    else:
        m = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None], 1)[:, 0]
        d, half_steps, q_max = np.abs(m / F32(-8)), 1.0, 8
    block_bound = half_steps * d + q_max * np.abs(d.astype(np.float16).astype(F32) - d) + 1e-6 * d
    run_bound = np.sqrt(64) * block_bound.reshape(-1, 2).max(1)
    f16_out = np.sqrt(64) * (2.0**-11 * np.abs(x).reshape(-1, 64).max(1) + 6e-8)  # rounding the output to f16
    err = np.linalg.norm((got - x).reshape(-1, 64), axis=1)
    assert (err <= run_bound + f16_out + 1e-6 * run_bound).all()


def _kivi_bound(x: np.ndarray, role: str) -> np.ndarray:
    """Per element: half a step of its group, plus what f16 rounding of scale and zero moves."""
    t, c = x.shape
    if role == "v":
        groups = x.reshape(-1, 32)
        mn, mx = groups.min(1, keepdims=True), groups.max(1, keepdims=True)
    else:
        g = max(1, t // 32)
        ids = np.minimum(np.arange(t) // 32, g - 1)
        mn = np.stack([x[ids == i].min(0) for i in range(g)])[ids]
        mx = np.stack([x[ids == i].max(0) for i in range(g)])[ids]
    s = (mx - mn) / F32(15)
    s16, z16 = s.astype(np.float16).astype(F32), mn.astype(np.float16).astype(F32)
    bound = s16 / 2 + np.abs(z16 - mn) + 15 * np.abs(s16 - s) + 1e-6 * (np.abs(mx) + np.abs(mn))
    return np.broadcast_to(bound, groups.shape).reshape(t, c) if role == "v" else bound


@PROPS
@given(kv_rows(), st.sampled_from(["k", "v"]))
def test_kivi4_error_is_half_a_step_per_group(x, role):
    t, c = x.shape
    p = encode("kivi4", x, role)
    assert len(p) == codecs.get_codec("kivi4").payload_bytes(t, c, role)
    got = codecs.kivi4_dequantize(p, t, c, role)
    assert (np.abs(got - x) <= _kivi_bound(x, role)).all()


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("t", [1, 31, 1024, 1056, 2 * 1024 + 45])  # one K group, whole groups, a tail of 13
def test_kivi4_decode_is_the_payload_layout_formula(t, role):
    c = 64
    x = (np.random.default_rng(t).standard_normal((t, c)) * np.linspace(0.1, 8, c)).astype(F32)
    p = encode("kivi4", x, role)
    buf, n = np.frombuffer(p, np.uint8), t * c // 32
    if role == "v":  # llama.cpp's q4_1 blocks: f16 d, f16 m, 16 bytes of nibbles
        blocks = buf.reshape(n, 20)
        scale, zero = (blocks[:, i : i + 2].copy().view("<f2").astype(F32) for i in (0, 2))
        nib = blocks[:, 4:]
        q = np.concatenate([nib & 15, nib >> 4], axis=1).astype(F32)
        want = (q * scale + zero).reshape(t, c)
    else:
        nib = buf[: 16 * n].reshape(n, 16)
        q = np.concatenate([nib & 15, nib >> 4], axis=1).astype(F32)  # [groups, 32]
        params = buf[16 * n :].view("<f2").astype(F32)
        g = max(1, t // 32)
        scale, zero = params.reshape(2, g, c)
        gi = np.minimum(np.arange(t) // 32, g - 1)  # the last group takes the t % 32 extra tokens
        want = q.reshape(t, c) * scale[gi] + zero[gi]
    assert codecs.kivi4_dequantize(p, t, c, role).tobytes() == want.tobytes()
    assert decode("kivi4", p, t, c, "f16", role) == want.astype("<f2").tobytes()


@settings(max_examples=40, deadline=None)
@given(st.integers(32, 5000), st.sampled_from([64, 192, 1024]))
def test_kivi4_is_at_least_3_2x_smaller_than_f16(t, c):
    kivi = codecs.get_codec("kivi4")
    f16_bytes = 2 * t * c * 2
    assert f16_bytes / (kivi.payload_bytes(t, c, "k") + kivi.payload_bytes(t, c, "v")) >= 3.2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t", [1, 2, 31, 33, 64, 97])
def test_all_zero_rows_decode_to_zeros_in_every_cache_type(name, t):
    x = np.zeros((t, 64), F32)
    for cache_type in codecs.CACHE_TYPES:
        for role in ("k", "v"):
            rows = decode(name, encode(name, x, role), t, 64, cache_type, role)
            if cache_type == "f16":  # q4_0's zero blocks carry d = -0.0 (as llama.cpp's do): -0.0 may come back
                assert (f16_rows(rows, t, 64) == 0).all()
            else:
                assert rows == codecs.quantize_rows(x, cache_type, role, 64).tobytes()


@PROPS
@given(kv_rows(), st.sampled_from(["k", "v"]))
def test_native_payloads_pass_through_and_conversions_agree(x, role):
    t, c = x.shape
    for name in ("q8_0", "q4_0"):
        p = encode(name, x, role)
        assert decode(name, p, t, c, name, role) == p  # the payload is the cache's rows: no re-layout
        assert p == codecs.quantize_rows(x, name, role, 64).tobytes()
    # f16 on the wire into a q8_0 cache: the decode side quantizes as the prefill side would have
    assert decode("f16", encode("f16", x), t, c, "q8_0", role) == encode("q8_0", x, role)
    # q8_0 -> q4_0 requantizes in the rotated basis without leaving it
    got = codecs.dequantize_rows(decode("q8_0", encode("q8_0", x, role), t, c, "q4_0", role), t, c, "q4_0", role, 64)
    assert np.isfinite(got).all()
    # kivi4 into a q8_0 cache is kivi4's values, rotated and quantized
    kv = codecs.kivi4_dequantize(encode("kivi4", x, role), t, c, role)
    assert decode("kivi4", encode("kivi4", x, role), t, c, "q8_0", role) == codecs.quantize_rows(kv, "q8_0", role, 64).tobytes()


def test_bp_zstd_stays_exact_as_a_thread_reuses_its_plane_buffers():
    """Each thread splits into buffers it keeps: a larger layer grows them, a smaller one uses their front."""
    rng = np.random.default_rng(5)
    for t in (64, 8, 256, 3, 256):
        x = rng.standard_normal((t, 64)).astype(np.float16)
        assert np.array_equal(lossless.decode_bp_zstd(lossless.encode_bp_zstd(x), x.size).view(np.uint16),
                              x.reshape(-1).view(np.uint16))


def test_bp_zstd_rejects_a_corrupt_payload():
    x = np.random.default_rng(3).standard_normal((40, 64)).astype(np.float16)
    p = bytearray(lossless.encode_bp_zstd(x))
    with pytest.raises(CodecError):
        decode("f16+bp-zstd", bytes(p[:-3]), 40, 64, "f16")
    p[8] ^= 0xFF
    with pytest.raises(CodecError):
        decode("f16+bp-zstd", bytes(p), 40, 64, "f16")


# --- torch encoders (prefill_gpu.kv_encode) = the numpy reference, byte for byte ------------------

_HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(not _HAS_TORCH, reason="torch is not installed (the `prefill` extra)")
@PROPS
@given(kv_rows(), st.sampled_from(["k", "v"]), st.sampled_from(["f16", "q8_0", "q4_0", "kivi4", "f16+bp-zstd"]),
       st.sampled_from([64, 128]))
def test_torch_encoders_match_the_numpy_reference(x, role, name, head_dim):
    import torch

    from prefill_gpu.kv_encode import ENCODERS

    assume(x.shape[1] % head_dim == 0 or head_dim == 64)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU's kernels, where there is one
    for device in devices:
        for rows in (torch.from_numpy(x), torch.from_numpy(x).half()):  # CPU engines give float32, CUDA float16
            got = ENCODERS[name](rows.to(device), role, head_dim).cpu().numpy().tobytes()
            assert got == encode(name, x, role, head_dim), device


@pytest.mark.skipif(not _HAS_TORCH, reason="torch is not installed (the `prefill` extra)")
@pytest.mark.parametrize("name", ["q8_0", "q4_0", "kivi4"])
@pytest.mark.parametrize("role", ["k", "v"])
def test_torch_encoders_match_the_reference_on_edge_blocks(name, role):
    """Blocks the random rows rarely hit: all +0.0, all -0.0, a basis vector (flat after the rotation:
    every element ties in magnitude, so the first must win) and its negation."""
    import torch

    from prefill_gpu.kv_encode import ENCODERS

    x = np.zeros((5, 128), dtype=F32)
    x[1] = -0.0
    x[2, 0] = x[2, 64] = 1.0
    x[3, 0] = x[3, 65] = -3.0
    x[4] = np.linspace(-2, 2, 128, dtype=F32)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = ENCODERS[name](torch.from_numpy(x).to(device), role, 64).cpu().numpy().tobytes()
        assert got == encode(name, x, role, 64), device
