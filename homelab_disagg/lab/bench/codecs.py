"""`homelab-disagg bench codecs`: every KV codec side by side on the real model.

For each codec: bytes per token on the wire and the ratio to f16; encode speed (torch, on the prefill
device the bench runs on) and decode speed (numpy, into the llama.cpp cache type the codec is
injected into), both as f16-equivalent GB/s (T * C * 2 bytes per matrix per second: what a 10GbE
link would otherwise carry), best and median of repeats; decode also as payload GB/s (wire bytes
consumed per second). Quality: torch KV -> encode -> decode -> inject into a llama.cpp context of
that cache type, teacher-forced (homelab_disagg.quality) against the f16 injection of the same
torch KV: top-1 agreement, mean KL and perplexity change, i.e. what the codec alone costs (`top1`,
`kl`, `ppl_change_pct`), judged by llama.cpp running the model's weights dequantized to float: with
the deployed quantized weights llama.cpp rounds activations to 8 bits, and any change to the KV, a
single last bit, already costs ~4% top-1 (the `1-ulp probe` row; `*_deployed` columns). Against
llama.cpp's own f16 prefill on the deployed weights (`*_vs_llama`): the whole path's cost; the f16
row's are the baseline every codec inherits. The `llama own` rows are llama.cpp prefilling into a
quantized cache itself.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

# (codec, llama.cpp cache type it is injected into)
CONFIGS = (("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("kivi4", "f16"), ("kivi4", "q8_0"),
           ("f16+bp-zstd", "f16"))
PROMPT_TOKENS_8 = (128, 180, 230, 280, 330, 380, 440, 512)  # as tests/conftest.py quality_texts
CONTINUATION_TOKENS = 48
PROBE = "1-ulp probe"  # not a codec: f16 KV with the last bit of 1 K element in 10,000 flipped


def config_name(codec: str, cache_type: str) -> str:
    """The codec's name when it goes into its own cache type (f16 for kivi4), else codec@cache."""
    from wire.codecs import get_codec

    return codec if cache_type == get_codec(codec).default_cache_type else f"{codec}@{cache_type}"


def quality_texts(model, num_prompts: int) -> list[tuple[list[int], int]]:
    """num_prompts texts of 128..512 prompt tokens plus 48 continuation tokens, tokenized by llama.cpp
    (the 8-prompt set is the one tests/conftest.py builds)."""
    from homelab_disagg.workload import make_prompt

    lengths = PROMPT_TOKENS_8 if num_prompts == 8 else np.linspace(128, 512, num_prompts).astype(int).tolist()
    out = []
    for i, prompt_tokens in enumerate(lengths):
        ids = model.tokenize(make_prompt(prompt_tokens + 80, start=4 * i), add_special=True, parse_special=False)
        out.append((ids[: prompt_tokens + CONTINUATION_TOKENS], prompt_tokens))
    return out


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure_speed(rows: list, info, codec: str, cache_type: str, repeats: int) -> dict:
    """Encode (the prefill worker's path: torch; for f16+bp-zstd the f16 rows to the host, then the layers
    pipelined over two codec threads) and decode (the decode worker's path) every layer's K and V of one
    prompt, `repeats` times. Decoding is timed twice: as the decode worker does it (K and V of a layer on
    two cores where the codec converts and the layer is large enough, `decode_gbps`) and on one core
    (`decode_gbps_1core`)."""
    import torch

    from decode_cpu.kv_assembler import decode_kv
    from prefill_gpu.kv_encode import HOST_ENCODED, encode_kv, host_encode_later, host_f16
    from wire.codecs import get_codec

    wire_codec = get_codec(codec)
    num_tokens, c = rows[0][0].shape
    f16_bytes = len(rows) * 2 * num_tokens * c * 2

    def encode_all():
        if codec in HOST_ENCODED:  # as the prefill worker: f16 rows to the host, layers pipelined on two threads
            pending = [host_encode_later(codec, host_f16(k), host_f16(v), info.head_dim) for k, v in rows]
            return [torch.from_numpy(p.result()) for pair in pending for p in pair]
        out = [p for k, v in rows for p in encode_kv(codec, k, v, info.head_dim)]
        if out[-1].device.type == "cuda":
            torch.cuda.synchronize()
        return out

    payloads = [p.cpu().numpy() for p in encode_all()]
    payload_bytes = sum(p.nbytes for p in payloads)
    layers = list(zip(payloads[0::2], payloads[1::2]))  # [(K payload, V payload)] per layer

    def decode_worker_path():
        for k, v in layers:
            decode_kv(wire_codec, k.data, v.data, num_tokens, c, cache_type, info.head_dim)

    def decode_one_core():
        for k, v in layers:
            for role, p in (("k", k), ("v", v)):
                wire_codec.decode(p.data, num_tokens, c, cache_type, role, info.head_dim)

    enc, dec = _timed(encode_all, repeats), _timed(decode_worker_path, repeats)
    dec1 = _timed(decode_one_core, repeats)
    return {
        "encode_gbps": f16_bytes / min(enc) / 1e9, "encode_gbps_median": f16_bytes / statistics.median(enc) / 1e9,
        "decode_gbps": f16_bytes / min(dec) / 1e9, "decode_gbps_median": f16_bytes / statistics.median(dec) / 1e9,
        "decode_gbps_1core": f16_bytes / min(dec1) / 1e9, "decode_payload_gbps": payload_bytes / min(dec) / 1e9,
        "speed_tokens": num_tokens,
    }


def measure(model_path: Path, num_prompts: int, repeats: int, progress=lambda: None,
            speed_tokens: int = 0) -> tuple[list[dict], dict]:
    """Quality over the prompts; speeds over every layer of the longest of them, or of a prompt of
    `speed_tokens` tokens when given (GPU encoders are launch-bound on short prompts).

    Each codec's KV is injected twice: into llama.cpp running the model's weights dequantized to float
    (the codec's own cost: `top1`, `kl`, `ppl_change_pct`) and running the deployed weights (`*_deployed`
    against the f16 injection, `*_vs_llama` against llama.cpp's own prefill). The `1-ulp probe` row is
    the f16 KV with one K element in 10,000 off by its last bit: each judge's noise floor."""
    import torch

    from homelab_disagg.config import PrefillWorkerConfig
    from homelab_disagg.model import read_model_info
    from homelab_disagg.lab.quality import (LlamaJudge, codec_state, compare, float_weights_model, nudge_keys, pool,
                                        torch_layer_rows)
    from prefill_gpu.engine import TorchPrefillEngine
    from wire import native, transport
    from wire.codecs import get_codec

    transport.keep_kv_buffers_off_mmap()  # as both workers' processes do: payloads and frames from the heap
    info = read_model_info(model_path)
    engine = TorchPrefillEngine(PrefillWorkerConfig(model_path, device="auto"), info)
    judge_model = float_weights_model(model_path)
    judges = {(w, t): LlamaJudge(path, n_ctx=1024, cache_type=t)
              for w, path in (("float", judge_model), ("deployed", model_path)) for t in ("f16", "q8_0", "q4_0")}
    try:
        texts = quality_texts(judges["deployed", "f16"].model, num_prompts)
        names = [config_name(c, t) for c, t in CONFIGS] + [PROBE]
        own = {f"llama own {t}": [] for t in ("q8_0", "q4_0")}
        vs_llama = {n: [] for n in names}  # deployed weights, against llama.cpp's own f16 prefill: the whole path
        vs_f16 = {(w, n): [] for w in ("float", "deployed") for n in names}  # against the f16 injection: the codec
        wire_bytes = dict.fromkeys(names, 0)
        num_cells, longest_rows = 0, None
        for ids, split in texts:
            targets = np.array(ids[split:])
            ref = judges["deployed", "f16"].reference(ids, split)
            for t in ("q8_0", "q4_0"):
                own[f"llama own {t}"].append(compare(ref, judges["deployed", t].reference(ids, split), targets))
            rows = torch_layer_rows(engine, info, ids[: split - 1])
            num_cells += split - 1
            states = {}  # name -> (cache type, state buffer): encoded and decoded once, injected into both judges
            n_stream = judges["deployed", "f16"].ctx.n_stream  # every judge has the same context shape
            for codec, cache_type, name, layer_rows in [(c, t, config_name(c, t), rows) for c, t in CONFIGS] + [
                    ("f16", "f16", PROBE, nudge_keys(rows))]:
                state, nbytes = codec_state(layer_rows, info, n_stream, cache_type, codec)
                states[name] = cache_type, state
                wire_bytes[name] += nbytes
            for weights in ("float", "deployed"):
                # name -> [positions, vocab] logits after injecting that codec's KV
                injected = {name: judges[weights, t].after_injection(ids, split, state) for name, (t, state) in states.items()}
                for name, logits in injected.items():
                    vs_f16[weights, name].append(compare(injected["f16"], logits, targets))
                    if weights == "deployed":
                        vs_llama[name].append(compare(ref, logits, targets))
            if longest_rows is None or rows[0][0].shape[0] > longest_rows[0][0].shape[0]:
                longest_rows = rows
            progress()
        if speed_tokens:
            from homelab_disagg.workload import make_long_prompt

            text = make_long_prompt(speed_tokens)
            ids = judges["deployed", "f16"].model.tokenize(text, add_special=True, parse_special=False)[:speed_tokens]
            longest_rows = torch_layer_rows(engine, info, ids)

        def quality(name: str) -> dict:
            alone, deployed, e2e = pool(vs_f16["float", name]), pool(vs_f16["deployed", name]), pool(vs_llama[name])
            return {
                "top1": alone.top1, "kl": alone.kl, "ppl_change_pct": alone.ppl_change_pct, "ppl": alone.ppl_candidate,
                "top1_deployed": deployed.top1, "kl_deployed": deployed.kl,
                "ppl_change_deployed_pct": deployed.ppl_change_pct,
                "top1_vs_llama": e2e.top1, "kl_vs_llama": e2e.kl, "ppl_change_vs_llama_pct": e2e.ppl_change_pct,
                "first_token_equal": e2e.first_token_equal, "positions": alone.positions,
            }

        out_rows, summary_codecs = [], {}
        for codec, cache_type in CONFIGS:
            name = config_name(codec, cache_type)
            bytes_per_token = wire_bytes[name] / num_cells
            row = {
                "codec": name, "cache": cache_type, "bytes_per_token": bytes_per_token,
                "ratio": info.kv_bytes_per_token_f16 / bytes_per_token, "lossless": get_codec(codec).is_lossless,
                **measure_speed(longest_rows, info, codec, cache_type, repeats), **quality(name),
            }
            out_rows.append(row)
            summary_codecs[name] = {k: v for k, v in row.items() if k not in ("codec", "positions")}
            progress()
        probe = {"codec": PROBE, "cache": "f16", **quality(PROBE)}
        out_rows.append(probe)
        own_summary = {}
        for name, results in own.items():
            agr, cache = pool(results), name.split()[-1]
            own_summary[cache] = {"top1_vs_llama": agr.top1, "kl_vs_llama": agr.kl,
                                  "ppl_change_vs_llama_pct": agr.ppl_change_pct}
            out_rows.append({"codec": name, "cache": cache, **own_summary[cache], "ppl": agr.ppl_candidate,
                             "first_token_equal": agr.first_token_equal, "positions": agr.positions})
        f16_e2e = pool(vs_llama["f16"])
        summary = {
            "codecs": summary_codecs, "llama_own": own_summary,
            "noise_floor": {k: v for k, v in probe.items() if k not in ("codec", "positions")},
            "prompts": len(texts), "positions": f16_e2e.positions,
            "ppl_ref": f16_e2e.ppl_ref, "ppl_f16_injection": f16_e2e.ppl_candidate,
            "ppl_f16_injection_float": pool(vs_f16["float", "f16"]).ppl_ref,
            "model": info.name, "judge_model": judge_model.name, "prefill_device": str(engine.device),
            "torch_threads": torch.get_num_threads(), "repeats": repeats, "native_kernel": native.available(),
        }
        return out_rows, summary
    finally:
        for j in judges.values():
            j.close()


def run_bench(model_path: Path, num_prompts: int, repeats: int, csv_path, json_out: bool, console,
              speed_tokens: int = 0) -> dict:
    from rich.progress import Progress

    from homelab_disagg.lab.bench.report import emit, table

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("codecs: prefill, encode, decode, inject, compare", total=num_prompts + len(CONFIGS))
        rows, summary = measure(model_path, num_prompts, repeats, progress=lambda: bar.advance(task),
                                speed_tokens=speed_tokens)
    from wire.codecs import get_codec

    shown = []
    for r in rows:
        speed = "encode_gbps" in r
        passes = speed and "@" not in r["codec"] and get_codec(r["codec"]).native_cache_type == r["cache"]
        shown.append({
            "codec": r["codec"], "cache": r["cache"],
            "bytes/token": round(r["bytes_per_token"]) if speed else "",
            "ratio vs f16": r.get("ratio", ""),
            "encode GB/s best/med": f"{r['encode_gbps']:.2f} / {r['encode_gbps_median']:.2f}" if speed else "",
            "decode GB/s best/med": (f"{r['decode_gbps']:.2f} / {r['decode_gbps_median']:.2f}"
                                     + (" (pass-through)" if passes else "")) if speed else "",
            "decode GB/s 1 core": r.get("decode_gbps_1core", ""),
            "decode payload GB/s": r.get("decode_payload_gbps", ""),
            "top1 vs f16 inj": r.get("top1", ""), "KL": f"{r['kl']:.5f}" if "kl" in r else "",
            "ppl change %": r.get("ppl_change_pct", ""),
            "top1 deployed": r.get("top1_deployed", ""),
            "KL deployed": f"{r['kl_deployed']:.5f}" if "kl_deployed" in r else "",
            "top1 vs llama.cpp": r["top1_vs_llama"], "ppl change vs llama.cpp %": r["ppl_change_vs_llama_pct"],
        })
    title = (f"KV codecs, {summary['model']}, {summary['prompts']} prompts (128-512 tokens), {summary['positions']} "
             f"teacher-forced positions vs the f16 injection, judged on the weights dequantized to float "
             f"({summary['judge_model']}, ppl {summary['ppl_f16_injection_float']:.3f}) and on the deployed weights "
             f"(`deployed`, ppl {summary['ppl_f16_injection']:.3f}), and vs llama.cpp's own f16 prefill "
             f"(ppl {summary['ppl_ref']:.3f}); encode: torch on "
             f"{summary['prefill_device']}, {summary['torch_threads']} threads; decode: the decode worker's path "
             f"(K and V of a layer on two cores where the codec converts; kivi4 in C: {summary['native_kernel']}) "
             f"and on one core; GB/s of f16 "
             f"KV, {summary['repeats']} repeats over every layer of a {rows[0]['speed_tokens']}-token prompt")
    emit("codecs", [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows], summary,
         [table(title, shown)], csv_path, json_out, console)
    return summary
