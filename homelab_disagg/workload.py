"""Workloads: prompts of chosen lengths built from bundled English text (no dataset download).

The text is the project's background document, cut into passages; a prompt of about N tokens is
a run of consecutive passages followed by a question, so prompts read like real requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

CHARS_PER_TOKEN = 4.3  # SmolLM2's tokenizer on this English text; only used to size prompts


def passages() -> list[str]:
    data = json.loads(resources.files("homelab_disagg").joinpath("data/passages.json").read_text())
    return data["passages"]


@dataclass(frozen=True)
class WorkloadItem:
    prompt: str
    max_tokens: int


def make_prompt(approx_tokens: int, start: int = 0) -> str:
    """About `approx_tokens` tokens of text starting at passage `start` (wrapping around)."""
    ps = passages()
    want_chars = int(approx_tokens * CHARS_PER_TOKEN)
    out, i = [], start
    while sum(len(p) + 1 for p in out) < want_chars:
        out.append(ps[i % len(ps)])
        i += 1
    text = " ".join(out)[:want_chars]
    return text.rsplit(" ", 1)[0] + "\n\nQuestion: what is the main point of the text above?\nAnswer:"


def make_long_prompt(num_tokens: int, start: int = 0) -> str:
    """make_prompt with room to spare, for callers that cut the token ids to exactly `num_tokens`: its
    estimate of characters per token runs short on long texts."""
    return make_prompt(num_tokens + num_tokens // 4 + 64, start)


def make_workload(num_requests: int, min_tokens: int = 128, max_tokens: int = 512, output_tokens: int = 32,
                  seed: int = 0) -> list[WorkloadItem]:
    """Prompt lengths spread evenly over [min_tokens, max_tokens], shuffled deterministically."""
    rng = random.Random(seed)
    n = max(1, num_requests)
    lengths = [min_tokens + (max_tokens - min_tokens) * i // max(1, n - 1) for i in range(n)]
    rng.shuffle(lengths)
    return [WorkloadItem(make_prompt(length, start=3 * i), output_tokens) for i, length in enumerate(lengths)]
