"""Model families: per GGUF architecture, the facts the KV handoff depends on. Pure data, no engine.

A family is what `general.architecture` names in a GGUF. Each differs from the others exactly where
handing torch-computed KV to llama.cpp is delicate:

    family  RoPE  caches llama.cpp keeps           q/k  attn bias  q/k norm  embedding  softcap
    llama   norm  one                              re-paired  -      -         -          -
    qwen2   neox  one                              as is      q,k,v  -         -          -
    qwen3   neox  one                              as is      -      q,k       -          -
    gemma3  neox  iswa: global layers + a second   as is      -      q,k       x sqrt(d)  -
                  cache of sliding-window layers

- RoPE layout: llama.cpp stores llama keys with interleaved-pair ("norm") RoPE while transformers'
  GGUF loader (and vLLM) hold them in rotate-half ("neox") order, so llama keys are re-paired on the
  way (prefill_gpu/kv_layout.py); neox families travel as they are.
- Caches: a "single" family's sequence state is one cache section (decode_cpu/kv_state.py); an "iswa"
  family's (llama_kv_cache_iswa) is two in a row: the global (non-sliding) layers, then the
  sliding-window layers, each section with its own stream headers, cells and layer count. llama.cpp
  keeps every cell of a sliding layer until it is overwritten; transformers keeps the last
  window - 1 tokens of a sliding layer.
- Llama 3 rope scaling: the GGUF carries the frequency factors as the tensor `rope_freqs.weight`
  (llama.cpp divides each RoPE frequency by its factor); transformers' GGUF loader ignores that
  tensor, so the torch engine applies it itself (prefill_gpu/engine.py).

Other architectures are refused by name, with what to do instead (`refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Handoff facts of one GGUF architecture, the same for every model of it."""

    architecture: str  # general.architecture
    rope_layout: str  # "norm": llama.cpp keeps keys interleaved (re-pair); "neox": rotate-half, as transformers
    caches: str  # "single": one KV cache; "iswa": global layers, then sliding-window layers in a second cache
    attention_bias: bool  # q, k and v projections carry biases (qwen2)
    qk_norm: bool  # RMS norm over each head of q and k before RoPE (qwen3, gemma3)
    embedding_scale: bool  # token embeddings multiplied by sqrt(hidden) (gemma)
    sliding_window_pattern: int  # iswa: every Nth layer is global, the others slide (0: none)
    rope_freqs_tensor: bool  # the GGUF may carry Llama 3's RoPE frequency factors (rope_freqs.weight)
    chat_template: str  # the template `model synth` writes (a real GGUF brings its own)
    handoff_ready: str = ""  # empty: the whole KV path serves it; else why it does not yet

    def __post_init__(self) -> None:
        if self.rope_layout not in ("norm", "neox"):
            raise ValueError(f"{self.architecture}: rope_layout {self.rope_layout!r} is not norm or neox")
        if self.caches not in ("single", "iswa"):
            raise ValueError(f"{self.architecture}: caches {self.caches!r} is not single or iswa")
        if (self.caches == "iswa") != (self.sliding_window_pattern > 0):
            raise ValueError(f"{self.architecture}: an iswa family needs a sliding-window pattern and only it")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends over a sliding window (llama.cpp's default pattern: every Nth global)."""
        n = self.sliding_window_pattern
        return n > 0 and (layer + 1) % n != 0


# ChatML: the default model's tokenizer (SmolLM2, reused by `model synth`) has <|im_start|>/<|im_end|>
# as special tokens, and llama.cpp's template matcher knows it. Qwen2/Qwen3 use the same markers.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == "
         "'assistant' else message['role']) + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("llama", "norm", "single", attention_bias=False, qk_norm=False, embedding_scale=False,
               sliding_window_pattern=0, rope_freqs_tensor=True, chat_template=CHATML),
        Family("qwen2", "neox", "single", attention_bias=True, qk_norm=False, embedding_scale=False,
               sliding_window_pattern=0, rope_freqs_tensor=False, chat_template=CHATML),
        Family("qwen3", "neox", "single", attention_bias=False, qk_norm=True, embedding_scale=False,
               sliding_window_pattern=0, rope_freqs_tensor=False, chat_template=CHATML),
        Family("gemma3", "neox", "iswa", attention_bias=False, qk_norm=True, embedding_scale=True,
               sliding_window_pattern=6, rope_freqs_tensor=False, chat_template=GEMMA,
               handoff_ready="the decode worker does not yet lay out a two-cache (iswa) sequence state"),
    )
}

# Architectures people bring, refused with what to do instead.
REFUSED: dict[str, str] = {
    "mistral": "llama.cpp converts Mistral models to the llama architecture; convert it with llama.cpp's "
               "convert_hf_to_gguf.py",
    "gemma": "convert the model anew with llama.cpp or use a gemma3 GGUF",
    "gemma2": "its logit softcapping and sliding-window layers are not mapped yet; use a gemma3, qwen2, qwen3 or "
              "llama GGUF",
    "phi3": "not mapped yet (neox RoPE, fused qkv); use a qwen2, qwen3 or llama GGUF",
    "qwen2moe": "mixture-of-experts families are not supported (docs/decisions.md says what they would take); "
                "use a dense qwen2 or qwen3 GGUF",
    "qwen3moe": "mixture-of-experts families are not supported (docs/decisions.md says what they would take); "
                "use a dense qwen3 GGUF",
}


def refusal(architecture: str) -> str:
    """Why `architecture` is refused and what to do; the same sentence wherever a model is checked."""
    supported = ", ".join(FAMILIES)
    why = REFUSED.get(architecture, "use a GGUF of a supported architecture")
    return f"architecture {architecture!r} is not supported (supported: {supported}): {why}"


def family_of(architecture: str) -> Family | None:
    return FAMILIES.get(architecture)
