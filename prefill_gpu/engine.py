"""The torch prefill engine: the GGUF's weights in transformers, on CUDA when present.

`prefill` runs the decoder stack (no LM head: the decode side samples the first token) and calls
`on_layer(i, k, v)` the moment layer i's KV exists, so the caller can ship it while layer i+1
computes. `generate` is the colocated baseline: prefill and greedy decode on this device.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from homelab_disagg.config import Env, PrefillWorkerConfig
from homelab_disagg.errors import ModelError
from homelab_disagg.model import ModelInfo

OnLayer = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, K [1,H,T,D], V [1,H,T,D])


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(device: torch.device, info: ModelInfo) -> torch.dtype:
    """fp32 wherever the weights fit with room to spare, else fp16 (llama.cpp's KV type).
    fp16 compute costs agreement with llama.cpp: teacher-forced top-1 93.1% in fp16 vs 95.9% in
    fp32 on the default model (H200 vs CPU, tests/test_injection.py)."""
    if device.type != "cuda":
        return torch.float32
    params = info.num_layers * 12 * info.hidden_size**2 + info.vocab_size * info.hidden_size  # rough
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return torch.float32 if 4 * params < 0.5 * free_bytes else torch.float16


def hf_checkpoint(info: ModelInfo, env: Env) -> Path:
    """The GGUF converted once (dequantized) into a transformers checkpoint, cached by fingerprint.
    Loading a GGUF through transformers dequantizes every tensor and rebuilds the tokenizer, which
    takes tens of seconds; the cached checkpoint loads in about one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dest = env.cache_dir / "hf" / info.fingerprint_hex
    if (dest / "config.json").exists():
        return dest
    tmp = dest.with_name(dest.name + ".part")
    config = AutoConfig.from_pretrained(info.path.parent, gguf_file=info.path.name)
    match_llama_cpp_config(config, info)
    model = AutoModelForCausalLM.from_pretrained(info.path.parent, gguf_file=info.path.name, config=config,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(info.path.parent, gguf_file=info.path.name)
    # the weights are plain dequantized tensors now; drop the GGUF marker so they save as such
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(dest)
    return dest


def match_llama_cpp_config(config, info: ModelInfo) -> None:
    """Where transformers' GGUF loader reads a family differently from llama.cpp, take llama.cpp's
    reading (homelab_disagg/families.py): the head size is the GGUF's key_length (transformers maps it for
    few families and Qwen3's config defaults it to 128); gemma3's attention scale is 1/sqrt(head_dim) there
    (1/sqrt(hidden / heads) for the 62-layer 27B), while transformers defaults query_pre_attn_scalar to 256."""
    if hasattr(config, "head_dim"):
        config.head_dim = info.head_dim
    if info.architecture == "gemma3":
        config.query_pre_attn_scalar = info.hidden_size // info.num_heads if info.num_layers == 62 else info.head_dim


def apply_rope_freqs(decoder, info: ModelInfo) -> None:
    """Llama 3 rope scaling: llama.cpp divides RoPE frequency i by the GGUF's rope_freqs[i]; transformers'
    GGUF loader ignores that tensor, so divide the rotary embedding's frequencies here (on every load: the
    frequencies are a buffer the checkpoint does not save)."""
    from homelab_disagg.model import read_rope_freqs

    factors = read_rope_freqs(info)
    if factors is None:
        return
    rotary = decoder.rotary_emb
    if rotary.inv_freq.shape != factors.shape:
        raise ModelError(f"{info.path.name}: rope_freqs has {factors.shape[0]} factors for {rotary.inv_freq.shape[0]} "
                         "RoPE frequencies; the GGUF contradicts itself")
    rotary.inv_freq = rotary.inv_freq / torch.from_numpy(factors).to(rotary.inv_freq.device, rotary.inv_freq.dtype)


class TorchPrefillEngine:
    def __init__(self, cfg: PrefillWorkerConfig, info: ModelInfo, env: Env | None = None):
        from transformers import AutoModelForCausalLM

        self.cfg, self.info = cfg, info
        self.device = pick_device(cfg.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.dtype = pick_dtype(self.device, info)
        path = hf_checkpoint(info, env or Env())
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.decoder = self.lm.model  # the decoder stack without the LM head
        apply_rope_freqs(self.decoder, info)
        self._on_layer: OnLayer | None = None
        self._cache = None
        for i, layer in enumerate(self.decoder.layers):
            layer.register_forward_hook(self._layer_hook(i))

    def _layer_hook(self, i: int):
        def hook(_module, _args, _out):
            if self._on_layer is not None:
                layer = self._cache.layers[i]
                self._on_layer(i, layer.keys, layer.values)

        return hook

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prefill(self, token_ids: list[int], on_layer: OnLayer) -> float:
        """Run the decoder over `token_ids`, calling on_layer per layer. Returns compute ms."""
        return self.prefill_and_sample(token_ids, on_layer, sample=False)[0]

    @torch.inference_mode()
    def prefill_and_sample(self, token_ids: list[int], on_layer: OnLayer, sample: bool = True) -> tuple[float, int]:
        """As prefill; with `sample`, also the greedy next token (the LM head over the last position
        only). Returns (compute ms, token id or -1)."""
        from transformers import DynamicCache

        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        self._cache = DynamicCache(config=self.lm.config)
        self._on_layer = on_layer
        try:
            t0 = time.perf_counter()
            hidden = self.decoder(input_ids=ids, past_key_values=self._cache, use_cache=True).last_hidden_state
            token = int(self.lm.lm_head(hidden[:, -1]).argmax()) if sample else -1  # [1, hidden] -> [1, vocab]
            self.sync()
            return (time.perf_counter() - t0) * 1e3, token
        finally:
            self._on_layer, self._cache = None, None

    @torch.inference_mode()
    def generate(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        """Greedy colocated generation. Returns (tokens, ttft_ms, decode_ms)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        logits = self.lm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        nxt = int(logits[0, -1].argmax())
        ttft_ms = (time.perf_counter() - t0) * 1e3
        out = [nxt]
        t1 = time.perf_counter()
        eos = self.lm.config.eos_token_id
        while len(out) < max_tokens and nxt != eos:
            step = torch.tensor([[nxt]], dtype=torch.long, device=self.device)
            logits = self.lm(input_ids=step, past_key_values=cache, use_cache=True).logits
            nxt = int(logits[0, -1].argmax())  # .item() syncs the device each step, as a server would
            out.append(nxt)
        return out, ttft_ms, (time.perf_counter() - t1) * 1e3

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[T, vocab] float32 logits for every position (quality checks only)."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self.lm(input_ids=ids).logits[0].float().cpu()
