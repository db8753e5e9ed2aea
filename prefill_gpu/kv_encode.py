"""Codec encoders on the prefill device (torch): quantize before the device-to-host copy, so only
the encoded bytes cross PCIe and the wire. Each must produce exactly the payload that the
matching wire codec (wire/codecs.py) decodes; tests pin that byte for byte."""

from __future__ import annotations

import torch


def encode_f16(rows: torch.Tensor) -> torch.Tensor:
    """rows: [T, C] any float -> [T, C] float16 (same device)."""
    return rows.to(torch.float16)


ENCODERS = {"f16": encode_f16}


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Start the device-to-host copy; returns (host tensor, event to wait on, or None on CPU)."""
    if t.device.type != "cuda":
        return t.contiguous(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event
