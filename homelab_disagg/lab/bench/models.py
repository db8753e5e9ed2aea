"""`homelab-disagg bench models`: each family's handoff proven against llama.cpp's own KV.

    per family: a tiny synthetic GGUF (homelab_disagg.synth, cached) -> torch engine + llama.cpp on the
    same weights (float) -> kv_match with the family's RoPE layout, and with it swapped
    the default model (real weights): the same check, whose error is the bound a family must stay within

Prints a table, writes CSV, and with --json the last line
`{"families": {"llama": {"kv_rel_err": ..., "kv_rel_err_swapped_rope": ...}, ...}, "default_model": ...}`.
"""

from __future__ import annotations

from pathlib import Path

from homelab_disagg.lab.bench.report import emit, table

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
BOUND_OVER_DEFAULT = 2.0  # a family passes at most this times the default model's error (same run)
SWAP_OVER_OWN = 10.0  # the swapped RoPE layout must come out at least this times worse


def prove(model_path: Path, prompt_tokens: int, device: str = "auto", threads: int = 0) -> dict:
    """kv_rel_err of one GGUF's torch KV against llama.cpp's own, and with its RoPE layout swapped."""
    from homelab_disagg.config import PrefillWorkerConfig
    from homelab_disagg.lab.kv_match import kv_match, swapped
    from homelab_disagg.lab.quality import LlamaJudge, float_weights_model
    from homelab_disagg.model import read_model_info
    from homelab_disagg.workload import make_prompt
    from prefill_gpu.engine import TorchPrefillEngine

    info = read_model_info(model_path, require_handoff=False)
    judge = LlamaJudge(float_weights_model(model_path), n_ctx=max(256, prompt_tokens), n_threads=threads)
    try:
        ids = judge.model.tokenize(make_prompt(prompt_tokens + 32), add_special=True, parse_special=False)[:prompt_tokens]
        engine = TorchPrefillEngine(PrefillWorkerConfig(info.path, device=device, num_threads=threads), info)
        own = kv_match(engine, judge, info, ids)
        swap = kv_match(engine, judge, info, ids, swapped(info.rope_layout))
    finally:
        judge.close()
    return {"kv_rel_err": own.kv_rel_err, "kv_rel_err_swapped_rope": swap.kv_rel_err, "rope_layout": info.rope_layout,
            "caches": info.caches, "layers": info.num_layers, "tokens": len(ids),
            "min_positions_compared": min(own.positions_compared)}


def run_bench(families: list[str], prompt_tokens: int, default_model: Path, device: str, threads: int, csv_path,
              json_out: bool, console) -> dict:
    from rich.progress import Progress

    from homelab_disagg.synth import SynthSpec, cached_synth

    results = {}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("families", total=len(families) + 1)
        default = prove(default_model, prompt_tokens, device, threads)
        bar.advance(task)
        for family in families:
            results[family] = prove(cached_synth(SynthSpec(family)), prompt_tokens, device, threads)
            bar.advance(task)
    bound = BOUND_OVER_DEFAULT * default["kv_rel_err"]
    for r in results.values():
        r["passes"] = r["kv_rel_err"] <= bound and r["kv_rel_err_swapped_rope"] >= SWAP_OVER_OWN * r["kv_rel_err"]
    rows = [{"model": "default (SmolLM2-135M Q4_1)", **default}] + [{"model": f"{f} (synth tiny)", **r}
                                                                   for f, r in results.items()]
    shown = [{k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    title = (f"KV of the torch engine against llama.cpp's own prefill ({prompt_tokens} tokens): max over layers, K and V "
             f"of ||ours - llama.cpp|| / ||llama.cpp||; bound {bound:.2e} = {BOUND_OVER_DEFAULT} x the default model's")
    summary = {"families": {f: {"kv_rel_err": r["kv_rel_err"], "kv_rel_err_swapped_rope": r["kv_rel_err_swapped_rope"],
                                "passes": r["passes"]} for f, r in results.items()},
               "default_model": {"kv_rel_err": default["kv_rel_err"],
                                 "kv_rel_err_swapped_rope": default["kv_rel_err_swapped_rope"]},
               "bound": bound}
    emit("models", rows, summary, [table(title, shown)], csv_path, json_out, console)
    return summary
