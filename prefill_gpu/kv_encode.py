"""Codec encoders on the prefill device (torch): quantize before the device-to-host copy, so only
the encoded bytes cross PCIe and the wire. Each must produce exactly the payload that the
matching wire codec (wire/codecs.py) decodes; tests pin that byte for byte against the numpy
reference there, so every step below is the same float32 arithmetic in the same order.

    ENCODERS[name](rows [T, C] float, role "k"|"v", head_dim) -> 1-D payload tensor (same device;
                                                                      HOST_ENCODED: on the host)
    encode_kv(name, K rows, V rows, head_dim) -> (K payload, V payload): one layer
    host_encode_later(name, K f16 host rows, V f16 host rows, ...) -> (Future, Future): the prefill worker's
        way for HOST_ENCODED codecs, which it stages as f16 first
"""

from __future__ import annotations

import functools
from concurrent.futures import Future

import numpy as np
import torch

from wire import codecs, lossless, two_cores

GROUP = codecs.GROUP


def _div(num, den: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """IEEE float32 division num / den. `scalar / t` in torch is reciprocal(t) * scalar, and CUDA turns
    `t / scalar` into t * (1/scalar): both round twice, so both operands become tensors first."""
    as_t = lambda v: v if isinstance(v, torch.Tensor) else torch.full_like(like, v)  # noqa: E731
    return torch.div(as_t(num), as_t(den))


def encode_f16(rows: torch.Tensor, role: str = "k", head_dim: int = 0) -> torch.Tensor:
    """rows: [T, C] any float -> [T, C] float16 (same device)."""
    return rows.to(torch.float16)


def _fwht(x: torch.Tensor, n: int) -> torch.Tensor:
    """[T, C] -> float32 [T*C/n, n] with H_n applied to each run of n elements: scale first, then
    butterflies of stride 1, 2, 4, ... (ggml's CPU arithmetic, as wire.codecs._fwht). The runs are
    transposed to [n, R] for the butterflies, so each step is two ops over long rows, ping-ponging
    between two buffers (on a GPU these encoders are bound by kernel launches, not bandwidth)."""
    runs = x.reshape(-1, n).T.float()  # [n, R] view (a copy only for half-precision input)
    r = runs.shape[1]
    a = torch.empty((n, r), dtype=torch.float32, device=x.device)
    torch.mul(runs, float(np.float32(1) / np.sqrt(np.float32(n))), out=a)
    b = torch.empty_like(a)
    h = 1
    while h < n:
        src, dst = a.view(n // (2 * h), 2, h * r), b.view(n // (2 * h), 2, h * r)  # [pairs, (u, v), h*R]
        torch.add(src[:, 0], src[:, 1], out=dst[:, 0])
        torch.sub(src[:, 0], src[:, 1], out=dst[:, 1])
        a, b = b, a
        h *= 2
    return a.T.contiguous()


def _blocks(rows: torch.Tensor, role: str, head_dim: int) -> torch.Tensor:
    """[T, C] -> [T*C/32, 32] float32, rotated as llama.cpp rotates a quantized cache of this role."""
    if rows.shape[-1] % GROUP:
        raise codecs.CodecError(f"quantized KV rows must be a multiple of {GROUP} elements, got {rows.shape[-1]}")
    n = codecs.hadamard_size(role, head_dim)
    x = _fwht(rows, n) if n else rows.float()
    return x.reshape(-1, GROUP)


def _with_scale(d: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """[nb] float32 scales + [nb, k] uint8 -> [nb*(2+k)] uint8 (f16 scale first, little-endian)."""
    return torch.cat((d.to(torch.float16).view(torch.uint8).view(-1, 2), body), dim=1).view(-1)


def encode_q8_0(rows: torch.Tensor, role: str, head_dim: int) -> torch.Tensor:
    b = _blocks(rows, role, head_dim)
    amax = b.abs().amax(dim=1)
    inv = torch.where(amax != 0, _div(127.0, amax, amax), torch.zeros_like(amax))
    q = torch.round(b * inv[:, None]).to(torch.int8)  # round: half to even, as _mm256_round_ps
    return _with_scale(_div(amax, 127.0, amax), q.view(torch.uint8))


def encode_q4_0(rows: torch.Tensor, role: str, head_dim: int) -> torch.Tensor:
    b = _blocks(rows, role, head_dim)  # [nb, 32]
    first = b.gather(1, b.abs().argmax(dim=1, keepdim=True))[:, 0]  # the first element of largest magnitude
    # d = m / -8, as a product: exact either way for a power of two. `+ 0.0` turns the -0.0 of an
    # all-zero block into +0.0, so d = -0.0 there, as in C.
    d = (first + 0.0) * -0.125
    inv = torch.where(d != 0, d.reciprocal(), 0.0)  # reciprocal is IEEE 1/d on CPU and CUDA
    # C's (int8_t) truncates; x/d + 8.5 lies in [0.5, 16.5], where truncating to uint8 is the same
    q = (b * inv[:, None] + 8.5).to(torch.uint8).clamp_max_(15)
    out = torch.empty((b.shape[0], 18), dtype=torch.uint8, device=b.device)  # f16 d, then 16 bytes of nibbles
    out[:, :2].view(torch.float16).copy_(d[:, None])
    torch.add(q[:, :16], q[:, 16:], alpha=16, out=out[:, 2:])  # q[j] | q[j+16] << 4: each nibble < 16
    return out.view(-1)


def _kivi_groups(g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 groups along dim -> (q uint8 like g, f16 scale, f16 zero with dim of size 1)."""
    mn, mx = g.amin(dim=dim, keepdim=True) + 0.0, g.amax(dim=dim, keepdim=True) + 0.0  # -0.0 -> +0.0, as numpy
    scale16, zero16 = _div(mx - mn, 15.0, mn).to(torch.float16), mn.to(torch.float16)
    scale, zero = scale16.float(), zero16.float()
    live = scale > 0
    q = torch.round(_div(g - zero, torch.where(live, scale, torch.ones_like(scale)), g))
    return torch.where(live, q.clamp(0, 15), torch.zeros_like(q)).to(torch.uint8), scale16, zero16


def encode_kivi4(rows: torch.Tensor, role: str, head_dim: int = 0) -> torch.Tensor:
    """KIVI int4 in wire.codecs' layout: K per channel over groups of 32 tokens (the last group takes
    the T % 32 extra tokens), V per token over groups of 32 channels as q4_1 blocks; f16 scale and zero
    per group."""
    num_tokens, row_elems = rows.shape
    if row_elems % GROUP:
        raise codecs.CodecError(f"quantized KV rows must be a multiple of {GROUP} elements, got {row_elems}")
    x = rows.float()
    if role == "v":  # q4_1 blocks: f16 scale, f16 zero, 16 bytes of nibbles
        q, scale, zero = _kivi_groups(x.reshape(-1, GROUP), dim=1)
        nib = q[:, :16] | (q[:, 16:] << 4)
        return torch.cat((scale.view(torch.uint8), zero.view(torch.uint8), nib), dim=1).reshape(-1)
    head = (max(1, num_tokens // GROUP) - 1) * GROUP
    parts = [_kivi_groups(x[:head].reshape(-1, GROUP, row_elems), dim=1)] if head else []
    parts.append(_kivi_groups(x[head:][None], dim=1))
    q, scale, zero = (torch.cat([p[i].reshape(-1, row_elems) for p in parts]) for i in range(3))
    q = q.reshape(-1, GROUP)
    nib = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat((nib.reshape(-1), scale.reshape(-1).view(torch.uint8), zero.reshape(-1).view(torch.uint8)))


def host_f16(rows: torch.Tensor) -> np.ndarray:
    """[T, C] rows -> float16 on the device, then in host memory: where a host encoder starts."""
    return rows.to(torch.float16).cpu().numpy()


def encode_f16_bp_zstd(rows: torch.Tensor, role: str = "k", head_dim: int = 0) -> torch.Tensor:
    """Lossless: f16 on the device, then byte planes + zstd on the host (a CPU tensor of the payload)."""
    return torch.from_numpy(lossless.encode_bp_zstd(host_f16(rows)))


# encoded on the host, to a size known only afterwards (the others: on the prefill device, fixed size)
HOST_ENCODED = {"f16+bp-zstd"}

ENCODERS = {
    "f16": encode_f16,
    "q8_0": encode_q8_0,
    "q4_0": encode_q4_0,
    "kivi4": encode_kivi4,
    "f16+bp-zstd": encode_f16_bp_zstd,
}


def encode_kv(codec: str, k_rows: torch.Tensor, v_rows: torch.Tensor,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V rows ([T, C] each) -> their payloads. Device encoders run on this thread, which
    launches their kernels; a host encoder's f16 rows go to the host and are coded on the two codec
    threads (host_encode_later)."""
    if codec not in HOST_ENCODED:
        encode = ENCODERS[codec]
        return encode(k_rows, "k", head_dim), encode(v_rows, "v", head_dim)
    k_pay, v_pay = host_encode_later(codec, host_f16(k_rows), host_f16(v_rows), head_dim)
    return torch.from_numpy(k_pay.result()), torch.from_numpy(v_pay.result())


def host_encode_later(codec: str, k_host: np.ndarray, v_host: np.ndarray, head_dim: int,
                      copied=None) -> tuple[Future, Future]:
    """A host-encoded codec's payloads of one layer (uint8 arrays) from its f16 rows in host memory ([T, C]
    each), as Futures: coded on the two codec threads while the caller goes on (wire.two_cores.later),
    after `copied` (a torch.cuda.Event, or None) has fired, since the rows are still on their way."""
    wire_codec = codecs.get_codec(codec)

    def code(rows: np.ndarray, role: str) -> np.ndarray:
        if copied is not None:
            copied.synchronize()
        return wire_codec.encode(rows, role, head_dim)

    return (two_cores.later(functools.partial(code, k_host, "k"), k_host.size),
            two_cores.later(functools.partial(code, v_host, "v"), v_host.size))


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Start the device-to-host copy; returns (host tensor, event to wait on, or None on CPU)."""
    if t.device.type != "cuda":
        return t.contiguous(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event

