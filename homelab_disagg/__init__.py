"""homelab-disagg: prefill on a GPU box, decode on a CPU box, KV streamed between them."""

__version__ = "0.1.0"
