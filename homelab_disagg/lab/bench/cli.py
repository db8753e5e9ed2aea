"""`homelab-disagg bench ...`: the lab's benchmark commands, plugged into the product's CLI through the
`homelab_disagg.commands` entry point. Each command's module owns its options' meaning; this file only
parses and hands over. Nothing heavy is imported until a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from homelab_disagg.errors import DisaggError
from homelab_disagg.shell import CACHE_TYPE_NAMES, CsvOpt, JsonOpt, ModelOpt, console, fail, resolve_model_path

app = typer.Typer(no_args_is_help=True, help="Benchmarks: ours and the baseline side by side, table + CSV + --json.")


@app.command("wire")
def bench_wire(
    model: ModelOpt = None,
    loopback_mb: Annotated[int, typer.Option(help="MiB moved per loopback measurement.")] = 512,
    link_mb: Annotated[int, typer.Option(help="MiB moved per Gbit of shaped link per measurement.")] = 96,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for the overlap measurement.")] = 1024,
    repeats: Annotated[int, typer.Option(help="Repeats per measurement (best goodput, median times).")] = 3,
    prefill_device: Annotated[str, typer.Option(help="Overlap's prefill worker: auto, cuda or cpu.")] = "auto",
    prefill_threads: Annotated[int, typer.Option(help="Overlap's prefill worker torch threads (0: default).")] = 0,
    decode_threads: Annotated[int, typer.Option(help="Overlap's decode worker llama.cpp threads (0: default).")] = 0,
    overlap_requests: Annotated[int, typer.Option(
        help="Timed requests per overlap mode and architecture, interleaved (medians; a GPU forward pass "
             "varies by ~10 ms from request to request).")] = 15,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """KV stream vs a plain TCP socket (loopback, 1 and 10 Gbit link lab) and layer-streaming overlap."""
    try:
        from homelab_disagg.lab.bench.wire import OverlapWorkers, run_bench

        workers = OverlapWorkers(prefill_device, prefill_threads, decode_threads)
        run_bench(resolve_model_path(model), loopback_mb, link_mb, prompt_tokens, repeats, csv, json_out, console, workers,
                  overlap_requests)
    except DisaggError as e:
        fail(e)


@app.command("decode")
def bench_decode(
    model: ModelOpt = None,
    threads: Annotated[int, typer.Option(help="llama.cpp threads, same for all (0: one per physical core available).")] = 0,
    batch: Annotated[int, typer.Option(help="Concurrent sequences in the batched run.")] = 8,
    slots: Annotated[int, typer.Option(help="Engine sequence slots (at least --batch).")] = 8,
    slot_ctx: Annotated[int, typer.Option(help="Context tokens per sequence, engine and llama.cpp loop alike.")] = 2048,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens whose KV each sequence starts from.")] = 128,
    steps: Annotated[int, typer.Option(help="Timed decode steps per configuration per round.")] = 32,
    warmup: Annotated[int, typer.Option(help="Untimed decode steps before them.")] = 4,
    repeats: Annotated[int, typer.Option(help="Rounds; each runs all configurations in turns (medians reported).")] = 7,
    kv_type: Annotated[str, typer.Option(help=f"KV cache type: {CACHE_TYPE_NAMES}.")] = "f16",
    omp_wait: Annotated[Optional[str], typer.Option(help="OMP_WAIT_POLICY for llama.cpp's threads: passive on a box "
                                                         "other processes load, unset on a dedicated one.")] = None,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Decode tokens/s: our batching engine (1 and --batch injected sequences) against llama.cpp's
    own single-sequence loop, same threads, context, flash attention and KV type."""
    try:
        from homelab_disagg.lab.bench.decode import run_bench

        run_bench(resolve_model_path(model), threads, batch, slots, slot_ctx, prompt_tokens, steps, warmup, repeats, kv_type,
                  csv, json_out, console, omp_wait)
    except DisaggError as e:
        fail(e)


@app.command("serve")
def bench_serve(
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible server: ours, llama.cpp's or vLLM's.")] = "http://127.0.0.1:8000",
    model: Annotated[Optional[str], typer.Option("--model", help="Model id to ask for. Default: the first of /v1/models.")] = None,
    endpoint: Annotated[str, typer.Option(help="completions or chat.")] = "completions",
    num_prompts: Annotated[int, typer.Option(help="Requests per sweep point.")] = 32,
    concurrency: Annotated[str, typer.Option(help="Max requests in flight; a comma list sweeps (1,2,4,8).")] = "1,2,4,8",
    request_rate: Annotated[str, typer.Option(help="Poisson arrival rate, requests/s; inf sends as fast as concurrency allows; a comma list sweeps.")] = "inf",
    input_len: Annotated[str, typer.Option(help="Prompt tokens: N, or MIN-MAX drawn uniformly.")] = "128-512",
    output_len: Annotated[str, typer.Option(help="Output tokens: N, or MIN-MAX drawn uniformly.")] = "32",
    goodput: Annotated[Optional[list[str]], typer.Option(help="SLO for goodput, vLLM style: --goodput ttft:500 --goodput tpot:50 (ms; ttft, tpot, e2el).")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly the output length (ignore_eos).")] = True,
    seed: Annotated[int, typer.Option(help="Seed for lengths and arrivals.")] = 0,
    result_json: Annotated[Optional[Path], typer.Option(help="Also write per-request TTFTs, ITLs and lengths here.")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Bearer token for a server that needs one. Default: "
                                                       "HOMELAB_DISAGG_API_KEY.")] = None,
    workload: Annotated[str, typer.Option(help="random (prompts of --input-len against --base-url) or multiturn "
                                               "(conversations against `serve` started here, KV reuse on and off).")] = "random",
    conversations: Annotated[int, typer.Option(help="multiturn: conversations, run at once.")] = 4,
    turns: Annotated[int, typer.Option(help="multiturn: turns per conversation.")] = 4,
    system_len: Annotated[int, typer.Option(help="multiturn: tokens of the shared system prompt (about).")] = 400,
    architecture: Annotated[str, typer.Option(help="multiturn: the local serve's architecture.")] = "colocated-cpu",
    device: Annotated[str, typer.Option(help="multiturn: its prefill worker's device (disaggregated).")] = "cpu",
    kv_pool_bytes: Annotated[str, typer.Option(help="multiturn: the decode worker's KV pool with reuse on.")] = "1G",
    gguf: Annotated[Optional[str], typer.Option(help="multiturn: the local serve's model (GGUF). Default: the "
                                                     "default model.")] = None,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Load an OpenAI-compatible endpoint with streaming requests and report what `vllm bench serve`
    reports: TTFT, TPOT, ITL, E2E (mean, median, p90, p99), request and token throughput, goodput.
    With --workload multiturn: growing conversations on a `serve` started here, the decode worker's KV
    pool on and off in one run: TTFT of later turns against the first, KV bytes shipped, same answers."""
    try:
        from homelab_disagg.config import Env

        if workload == "multiturn":
            from homelab_disagg.lab.bench.multiturn import MultiturnOptions
            from homelab_disagg.lab.bench.multiturn import run_bench as run_multiturn
            from homelab_disagg.lab.bench.serve import LengthRange

            mt = MultiturnOptions(resolve_model_path(Path(gguf) if gguf else None), conversations, turns, system_len,
                                  LengthRange.parse(output_len, "--output-len").lo, architecture, device, kv_pool_bytes)
            run_multiturn(mt, csv, json_out, console)
            return
        if workload != "random":
            from homelab_disagg.errors import ConfigError

            raise ConfigError(f"--workload {workload!r} is not random or multiturn")
        from homelab_disagg.lab.bench.serve import BenchOptions, LengthRange, parse_goodput, parse_sweep, run_bench

        opts = BenchOptions(
            base_url=base_url, model=model, endpoint=endpoint, num_prompts=num_prompts,
            concurrencies=tuple(int(c) for c in parse_sweep(concurrency, "--concurrency")),
            request_rates=tuple(parse_sweep(request_rate, "--request-rate", allow_inf=True)),
            input_len=LengthRange.parse(input_len, "--input-len"), output_len=LengthRange.parse(output_len, "--output-len"),
            goodput=parse_goodput(goodput or []), ignore_eos=ignore_eos, seed=seed,
            api_key=api_key or Env().api_key,
        )
        run_bench(opts, csv, json_out, console, result_json)
    except DisaggError as e:
        fail(e)


@app.command("codecs")
def bench_codecs(
    model: ModelOpt = None,
    prompts: Annotated[int, typer.Option(help="Prompts (128-512 tokens) in the quality comparison.")] = 8,
    repeats: Annotated[int, typer.Option(help="Timed repeats of each codec's encode and decode (best and median).")] = 7,
    speed_tokens: Annotated[int, typer.Option(help="Prompt tokens of the layer the speeds are timed on (0: the "
                                                   "longest quality prompt).")] = 0,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """KV codecs side by side: bytes per token, encode (torch) and decode (numpy, C) GB/s, and the quality
    of the injected KV: teacher-forced top-1, KL and perplexity change against the f16 injection (the
    codec alone) and against llama.cpp's own f16 prefill (the whole path)."""
    try:
        from homelab_disagg.lab.bench.codecs import run_bench

        run_bench(resolve_model_path(model), prompts, repeats, csv, json_out, console, speed_tokens)
    except DisaggError as e:
        fail(e)


@app.command("models")
def bench_models(
    family: Annotated[Optional[list[str]], typer.Option(help="Families to prove (repeat; default: llama, qwen2, qwen3, "
                                                            "gemma3).")] = None,
    model: ModelOpt = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens whose KV is compared.")] = 96,
    device: Annotated[str, typer.Option(help="Torch engine device: auto, cuda or cpu.")] = "auto",
    threads: Annotated[int, typer.Option(help="Threads of both engines (0: their defaults).")] = 0,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Each family's handoff proven on a tiny synthetic model: the KV the torch engine exports against
    llama.cpp's own prefill KV of the same tokens, per layer and cache, with the family's RoPE layout and
    with it swapped; the default model (--model) gives the bound."""
    try:
        from homelab_disagg.lab.bench.models import FAMILIES, run_bench

        run_bench(list(family or FAMILIES), prompt_tokens, resolve_model_path(model), device, threads, csv, json_out,
                  console)
    except DisaggError as e:
        fail(e)


@app.command("chaos")
def bench_chaos(
    model: ModelOpt = None,
    requests: Annotated[int, typer.Option(help="Requests under faults.")] = 240,
    concurrency: Annotated[int, typer.Option(help="Requests in flight, under faults and in the soak.")] = 8,
    faults: Annotated[int, typer.Option(help="Faults in turn: kill -9 a decode worker, SIGSTOP the prefill worker, "
                                             "kill -9 a decode worker, kill -9 the prefill worker.")] = 8,
    stop_s: Annotated[float, typer.Option(help="Seconds a SIGSTOPped prefill worker stays stopped.")] = 5.0,
    fuzz_messages: Annotated[int, typer.Option(help="Fuzzed messages over the worker ports (the API gets a twentieth more).")] = 10_000,
    soak_requests: Annotated[int, typer.Option(help="Requests in the soak (RSS measured once warm and at the end).")] = 1000,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request.")] = 16,
    decode_workers: Annotated[int, typer.Option(help="Local decode workers.")] = 2,
    device: Annotated[str, typer.Option(help="Prefill worker's device: auto, cuda or cpu.")] = "cpu",
    max_seconds: Annotated[float, typer.Option(help="Bound on the whole run; phases stop issuing requests past it.")] = 3600.0,
    log_dir: Annotated[Optional[Path], typer.Option(help="Worker and server logs. Default: results/chaos-logs-<time>.")] = None,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Faults survived on purpose, on this machine: a streaming load while workers are killed, stopped
    and restarted; fuzzed input at every port; a soak. Counts every request as completed, a clear
    error, or lost (must be 0)."""
    try:
        from homelab_disagg.lab.bench.chaos import ChaosOptions, run_bench

        opts = ChaosOptions(requests=requests, concurrency=concurrency, faults=faults, stop_s=stop_s,
                            fuzz_messages=fuzz_messages, soak_requests=soak_requests, max_tokens=max_tokens,
                            num_decode=decode_workers, device=device, max_seconds=max_seconds)
        run_bench(resolve_model_path(model), opts, csv, json_out, console, log_dir)
    except DisaggError as e:
        fail(e)
