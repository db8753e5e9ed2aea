"""wire.ggml: ggml's float16 converter and q4_1 dequantizer give numpy's bits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from wire import ggml

needs_ggml = pytest.mark.skipif(ggml.ggml_converter() is None,
                                reason="llama-cpp-python (its ggml-cpu library) is not installed: pip install .[decode]")

EDGES = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 1e6, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 6e-8,
         -3.1e-5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11]  # largest, rounding to inf, subnormals, exact ties


@needs_ggml
def test_ggml_and_numpy_round_every_magnitude_the_same():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(20_000) * s for s in (1e-8, 1e-5, 1e-2, 1.0, 300.0, 7e4)] + [EDGES])
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert np.array_equal(ggml.to_f16(x).view(np.uint16), want.view(np.uint16))



@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=9000),
                  elements={"allow_nan": False}))
def test_to_f16_is_numpy_astype(x):
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
        got = ggml.to_f16(x)
    assert got.shape == x.shape and got.dtype == np.float16
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def _q4_1_blocks(rng, n: int) -> np.ndarray:
    """n random q4_1 blocks: finite f16 d and m of every magnitude (zero and subnormal included)."""
    blocks = rng.integers(0, 256, (n, 20), dtype=np.uint8)
    dm = (rng.standard_normal((n, 2)) * 10.0 ** rng.integers(-8, 4, (n, 2))).astype("<f2")
    dm[:7, 0] = [0.0, -0.0, 6e-8, 2.0**-24, 1.0, 65504.0, -3.0]
    blocks[:, :4] = dm.view(np.uint8)
    return blocks


@pytest.mark.skipif(ggml.ggml_q4_1_dequantizer() is None,
                    reason="llama-cpp-python (its ggml-base library) is not installed: pip install .[decode]")
@pytest.mark.parametrize("n", [128, 4096])  # both above the size where ggml takes over
def test_ggml_q4_1_dequantizer_is_numpy_q_times_d_plus_m(n):
    blocks = _q4_1_blocks(np.random.default_rng(n), n)
    d, m = (blocks[:, i : i + 2].copy().view("<f2").astype(np.float32) for i in (0, 2))
    q = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1).astype(np.float32)
    want = (q * d + m).reshape(-1)
    got = ggml.dequantize_q4_1(blocks.tobytes(), 32 * n)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_numpy_q4_1_dequantizer_below_the_ggml_size():
    blocks = _q4_1_blocks(np.random.default_rng(3), 7)  # 224 elements: numpy's path
    got = ggml.dequantize_q4_1(blocks.tobytes(), 224).reshape(7, 32)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    assert got[:, 0].tolist() == ((blocks[:, 4] & 15) * d[:, 0] + m[:, 0]).tolist()
    assert got[:, 16].tolist() == ((blocks[:, 4] >> 4) * d[:, 0] + m[:, 0]).tolist()


def test_type_ids_are_llama_cpps():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install .[decode]")
    for t in ggml.GGML_TYPES.values():
        assert t.type_id == getattr(llama_cpp, f"GGML_TYPE_{t.name.upper()}")


def test_rows_are_whole_blocks():
    assert [ggml.GGML_TYPES[t].row_bytes(64) for t in ("f16", "q4_0", "q4_1", "q8_0")] == [128, 36, 40, 68]
    with pytest.raises(ValueError, match="multiple of 32"):
        ggml.GGML_TYPES["q8_0"].row_bytes(48)
