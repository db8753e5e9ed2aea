"""KvStaging writes exactly the payloads of the per-tensor path (layer rows -> encoder), every codec."""

from concurrent.futures import Future

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the `prefill` extra)")

from prefill_gpu.kv_encode import ENCODERS, HOST_ENCODED  # noqa: E402
from prefill_gpu.kv_layout import layer_rows  # noqa: E402
from prefill_gpu.kv_stage import KvStaging  # noqa: E402
from wire import transport  # noqa: E402


@pytest.mark.parametrize("codec", sorted(ENCODERS))
def test_staged_payloads_equal_the_encoders_own(model_info, codec):
    h, d = model_info.num_kv_heads, model_info.head_dim
    num_tokens = 45  # not a multiple of 32: KIVI's last key group is a ragged one
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        staging = KvStaging(model_info, torch.device(device))
        gen = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.float16):
            staging.begin(codec, num_tokens)
            for i in range(3):
                # a cache longer than the prompt, as transformers' may be
                k, v = (torch.randn(1, h, num_tokens + 3, d, generator=gen).to(dtype).to(device) for _ in range(2))
                k_pay, v_pay, event = staging.stage(i, k, v)
                assert (event is not None) == (device == "cuda" and codec not in HOST_ENCODED)
                assert isinstance(k_pay, Future) == (codec in HOST_ENCODED)  # coded on the codec threads
                k_pay, v_pay = transport.payload(k_pay), transport.payload(v_pay)
                if event is not None:
                    event.synchronize()
                k_rows, v_rows = layer_rows(k, v, num_tokens, model_info.rope_layout)
                want_k = ENCODERS[codec](k_rows, "k", d).cpu().contiguous().view(torch.uint8).numpy().ravel()
                want_v = ENCODERS[codec](v_rows, "v", d).cpu().contiguous().view(torch.uint8).numpy().ravel()
                assert np.array_equal(np.frombuffer(k_pay, np.uint8), want_k), (device, dtype, i, "k")
                assert np.array_equal(np.frombuffer(v_pay, np.uint8), want_v), (device, dtype, i, "v")


@pytest.mark.parametrize("token_major_memory", [False, True])
def test_keys_are_re_paired_for_llama_rope_and_values_kept(model_info, token_major_memory):
    """Staged f16: element 2i+j of a key head is hf's j*D/2+i (llama.cpp's interleaved pairs), values keep
    their order; whatever the cache tensors' strides (transformers' may be token-major in memory)."""
    assert model_info.rope_layout == "norm"
    h, d, t = model_info.num_kv_heads, model_info.head_dim, 4
    x = torch.arange(h * t * d, dtype=torch.float32).reshape(1, h, t, d)
    if token_major_memory:  # same values, [1, T, H, D] in memory
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    staging = KvStaging(model_info, torch.device("cpu"))
    staging.begin("f16", t)
    k_pay, v_pay, _ = staging.stage(0, x, x)
    got_k = np.frombuffer(k_pay, np.float16).reshape(t, h, d)
    got_v = np.frombuffer(v_pay, np.float16).reshape(t, h, d)
    for i in range(d // 2):
        for j in (0, 1):
            assert got_k[1, 2, 2 * i + j] == x[0, 2, 1, j * d // 2 + i].item()
    assert np.array_equal(got_v, x[0].transpose(0, 1).numpy().astype(np.float16))


@pytest.mark.parametrize("codec", ["f16+bp-zstd", "kivi4"])
def test_a_long_layer_encodes_on_two_cores_only_on_the_host(model_info, codec, codec_thread_uses):
    """encode_kv: a host encoder codes K and V on the codec threads (same bytes as one core); device
    encoders stay on the thread that launches their kernels."""
    from prefill_gpu.kv_encode import encode_kv

    num_tokens = 1024  # x 192 elements per row: past two_cores.MIN_ELEMS
    used = codec_thread_uses
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(num_tokens, model_info.kv_row_elems, generator=gen) for _ in range(2))
    k_pay, v_pay = encode_kv(codec, k, v, model_info.head_dim)
    assert used == ([1, 1] if codec in HOST_ENCODED else [])
    assert torch.equal(k_pay.cpu(), ENCODERS[codec](k, "k", model_info.head_dim).cpu())
    assert torch.equal(v_pay.cpu(), ENCODERS[codec](v, "v", model_info.head_dim).cpu())
    assert not torch.equal(k_pay.cpu(), v_pay.cpu())
