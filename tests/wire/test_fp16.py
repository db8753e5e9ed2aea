"""wire.fp16: ggml's float16 converter gives numpy's bits, for every class of float32."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from wire import fp16

needs_ggml = pytest.mark.skipif(fp16.ggml_converter() is None,
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
    assert np.array_equal(fp16.to_f16(x).view(np.uint16), want.view(np.uint16))



@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=9000),
                  elements={"allow_nan": False}))
def test_to_f16_is_numpy_astype(x):
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
        got = fp16.to_f16(x)
    assert got.shape == x.shape and got.dtype == np.float16
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
