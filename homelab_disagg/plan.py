"""The decision model (§11): which architecture serves a workload best on a two-node lab, and why.

    model geometry (GGUF header or a preset) + link + calibration (costs the experiments measured)
    -> Costs: each stage's time for this model, scaled from the calibrated model by size
    -> simulate(arch, workload, concurrency): N requests, at most C in flight, through both nodes
    -> TTFT, TPOT, throughput per architecture -> crossover -> recommendation with its reasons

The fixed hardware budget is two nodes: a GPU node (torch) and a CPU node (llama.cpp).
    single-cpu     llama.cpp alone on the CPU node; prompts prefill in chunks inside its decode steps
    single-gpu     torch alone on the GPU node; one request at a time (what `colocated-gpu` does)
    replicated     both, round-robin (the coordinator's `replicated`)
    disaggregated  prefill on the GPU node -> KV per layer over the link -> decode on the CPU node

Scaling to another model (same hardware): prefill ~ FLOPs ~ parameters, its quadratic attention
term ~ layers x hidden, fixed per-pass costs ~ layers; a decode step ~ bytes of weights read + KV
bytes read (per MB, as measured); KV bytes per token from the geometry and the codec. The link
moves the KV at its measured efficiency; with layer streaming a layer goes out as soon as it is
computed, so what is exposed after the forward pass is about one layer's transfer when a layer
computes slower than it transfers, else the difference accumulated over the layers.

Engine-free: numpy, the gguf header reader, and the wire's codec registry for KV sizes and cache
types. homelab_disagg/calibration.py turns the experiments' CSVs into a `Calibration`; without one,
`DEFAULT_CALIBRATION` (measured on the 2-core dev box).
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from homelab_disagg.errors import ConfigError, ModelError
from wire import codecs, ggml

ARCHS = ("single-cpu", "single-gpu", "replicated", "disaggregated")
COORDINATOR_ARCH = {"single-cpu": "colocated-cpu", "single-gpu": "colocated-gpu", "replicated": "replicated",
                    "disaggregated": "disaggregated"}
CONCURRENCIES = (1, 2, 4, 8, 16, 32)
N_BATCH = 512  # llama.cpp batch of the decode worker: prompt tokens a step may carry


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelProfile:
    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_params: int
    weight_bytes: int  # what one decode step reads: every tensor but an untied token-embedding table

    @property
    def kv_elems_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim  # K and V of every layer

    def kv_bytes_per_token(self, codec: str = "f16") -> float:
        """On the wire in `codec` (for a variable-size codec, its typical size)."""
        return self.kv_elems_per_token * codecs.get_codec(codec).bytes_per_elem

    def kv_cache_bytes_per_token(self, cache_type: str = "f16") -> float:
        """In a llama.cpp cache of `cache_type`."""
        t = ggml.GGML_TYPES[cache_type]
        return self.kv_elems_per_token * t.block_bytes / t.block_elems

    @classmethod
    def from_gguf(cls, path: Path) -> "ModelProfile":
        """Geometry from the header, parameters and bytes from the tensor table (one read of the header)."""
        from homelab_disagg.model import open_gguf

        path, reader, arch, field = open_gguf(path)
        heads, hidden = int(field(f"{arch}.attention.head_count")), int(field(f"{arch}.embedding_length"))
        names = {t.name for t in reader.tensors}
        # a tied model's LM head is the embedding table, read whole each step; an untied one reads one row of it
        skipped = "token_embd.weight" if "output.weight" in names else None
        return cls(str(field("general.name", path.stem)), int(field(f"{arch}.block_count")), heads,
                   int(field(f"{arch}.attention.head_count_kv", heads)),
                   int(field(f"{arch}.attention.key_length", hidden // heads)), hidden,
                   int(sum(int(t.n_elements) for t in reader.tensors)),
                   int(sum(int(t.n_bytes) for t in reader.tensors if t.name != skipped)))


# Geometry of models one may plan for without their GGUF at hand (weights: Q4_K_M sizes, read per step).
PRESETS = {
    "smollm2-135m": ModelProfile("SmolLM2-135M", 30, 9, 3, 64, 576, 134_515_008, 96_576_768),
    "llama-3.2-1b": ModelProfile("Llama-3.2-1B", 16, 32, 8, 64, 2048, 1_235_814_400, 700_000_000),
    "llama-3.2-3b": ModelProfile("Llama-3.2-3B", 28, 24, 8, 128, 3072, 3_212_749_824, 1_800_000_000),
    "llama-3.1-8b": ModelProfile("Llama-3.1-8B", 32, 32, 8, 128, 4096, 8_030_261_248, 4_400_000_000),
    "qwen2.5-7b": ModelProfile("Qwen2.5-7B", 28, 28, 4, 128, 3584, 7_615_616_512, 4_100_000_000),
}


def resolve_profile(model: str | Path | None) -> ModelProfile:
    """None: the default model; a GGUF path; or a preset name (also as a missing `name.gguf`)."""
    if model is None:
        from homelab_disagg.model import default_model_path

        return ModelProfile.from_gguf(default_model_path())
    p = Path(model).expanduser()
    if p.is_file():
        return ModelProfile.from_gguf(p)
    key = p.name.lower().removesuffix(".gguf")
    for name, prof in PRESETS.items():
        if key == name or key.startswith(name + "-") or key.startswith(name + "."):
            return prof
    raise ModelError(f"{model} is neither a GGUF file nor a known model ({', '.join(PRESETS)})")


# --- the link -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    rate_gbit: float | None  # None: loopback (both nodes on one box)
    efficiency: float = 0.94  # KV goodput / line rate
    loopback_gbps: float = 8.0  # KV goodput on loopback, Gbit/s

    @property
    def goodput_bytes_per_ms(self) -> float:
        gbit = self.loopback_gbps if self.rate_gbit is None else self.rate_gbit * self.efficiency
        return gbit * 1e9 / 8 / 1e3

    @property
    def label(self) -> str:
        return "loopback" if self.rate_gbit is None else f"{self.rate_gbit:g} Gbit"


def parse_link(text: str) -> float | None:
    """"10gbit", "10G", "2.5gbe", "100mbit", "loopback" -> Gbit/s (None for loopback)."""
    t = text.strip().lower().replace(" ", "")
    if t in ("loopback", "lo", "none", "local", "unshaped"):
        return None
    for suffix, scale in (("gbit/s", 1), ("gbit", 1), ("gbps", 1), ("gbe", 1), ("g", 1), ("mbit", 1e-3), ("m", 1e-3)):
        if t.endswith(suffix):
            try:
                return float(t[: -len(suffix)]) * scale
            except ValueError:
                break
    try:
        return float(t)
    except ValueError:
        raise ConfigError(f"link {text!r}: use e.g. 1gbit, 10gbit, 25gbit or loopback") from None


# --- what the lab measured ----------------------------------------------------------------------


@dataclass(frozen=True)
class Poly:
    """c0 + c1 x + c2 x^2 (ms)."""

    c0: float = 0.0
    c1: float = 0.0
    c2: float = 0.0

    def __call__(self, x: float) -> float:
        return self.c0 + self.c1 * x + self.c2 * x * x

    def scaled(self, s0: float, s1: float, s2: float) -> "Poly":
        return Poly(self.c0 * s0, self.c1 * s1, self.c2 * s2)

    @classmethod
    def fit(cls, xs, ys, degree: int = 2, intercept: bool = True) -> "Poly":
        """Least squares of the relative error with non-negative coefficients (a cost never falls
        with more tokens); every subset of terms is tried, which is exact for three terms."""
        import numpy as np

        x, y = np.asarray(xs, float), np.asarray(ys, float)
        if len(x) == 0:
            return cls()
        w = 1.0 / np.maximum(np.abs(y), 1e-9)
        cols = [i for i in range(degree + 1) if intercept or i > 0]
        best, best_err = np.zeros(3), math.inf
        for r in range(1, len(cols) + 1):
            for subset in itertools.combinations(cols, r):
                a = np.stack([x**i * w for i in subset], axis=1)
                coef, *_ = np.linalg.lstsq(a, y * w, rcond=None)
                if (coef < 0).any():
                    continue
                err = float(((a @ coef - y * w) ** 2).sum())
                if err < best_err:
                    best_err, best = err, np.zeros(3)
                    best[list(subset)] = coef
        return cls(*map(float, best))


@dataclass(frozen=True)
class Calibration:
    """Per-stage costs measured on one lab with one model (ms; x = tokens or context tokens)."""

    model: ModelProfile  # the model the costs were measured with
    source: str  # where they come from (directory or probe, host, prefill device)
    gpu_prefill_ms: Poly  # GPU node: forward pass over T tokens, no LM head (disaggregated prefill)
    gpu_ttft_ms: Poly  # GPU node alone: prefill of T tokens + LM head + first token
    gpu_tpot_ms: Poly  # GPU node alone: one greedy step at context x (batch 1, one request at a time)
    cpu_prefill_ms: Poly  # CPU node: llama.cpp prompt processing of T tokens, beyond the step base
    cpu_step_ms: float  # CPU node: a decode step's base (weights read once per step)
    cpu_seq_ms: float  # CPU node: per sequence in the step
    cpu_kv_ms_per_mb: float  # CPU node: per MB of KV cache a step reads
    inject_ms_per_mb: float  # CPU node: llama_state_seq_set_data per MB of cache
    admit_ms: float  # coordinator <-> decode worker admission round trip
    encode_ms_per_mb: dict = field(default_factory=lambda: {"f16": 0.5})  # GPU node, per MB of f16 KV
    convert_ms_per_mb: dict = field(default_factory=lambda: {"f16": 0.2})  # CPU node, frames -> cache, per MB of f16 KV
    link_efficiency: dict = field(default_factory=dict)  # Gbit/s (str) -> KV goodput / rate
    loopback_gbps: float = 8.0
    node_overlap_speed: float = 1.0  # each node's speed while the other computes too (1.0: separate hosts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        d = dict(d)
        d["model"] = ModelProfile(**d["model"])
        for k in ("gpu_prefill_ms", "gpu_ttft_ms", "gpu_tpot_ms", "cpu_prefill_ms"):
            d[k] = Poly(**d[k])
        return cls(**d)

    def scaled(self, gpu_prefill: float = 1.0, gpu_decode: float = 1.0, cpu_prefill: float = 1.0,
               cpu_decode: float = 1.0) -> "Calibration":
        """The same lab with each node's stages slower (> 1) or faster (< 1) by these factors."""
        return replace(
            self, gpu_prefill_ms=self.gpu_prefill_ms.scaled(gpu_prefill, gpu_prefill, gpu_prefill),
            gpu_ttft_ms=self.gpu_ttft_ms.scaled(gpu_prefill, gpu_prefill, gpu_prefill),
            encode_ms_per_mb={k: v * gpu_prefill for k, v in self.encode_ms_per_mb.items()},
            gpu_tpot_ms=self.gpu_tpot_ms.scaled(gpu_decode, gpu_decode, gpu_decode),
            cpu_prefill_ms=self.cpu_prefill_ms.scaled(cpu_prefill, cpu_prefill, cpu_prefill),
            cpu_step_ms=self.cpu_step_ms * cpu_decode, cpu_seq_ms=self.cpu_seq_ms * cpu_decode,
            cpu_kv_ms_per_mb=self.cpu_kv_ms_per_mb * cpu_decode,
        )

    def link(self, rate_gbit: float | None) -> Link:
        """The link at its measured efficiency (nearest measured rate; 0.94 if none was measured)."""
        if rate_gbit is None or not self.link_efficiency:
            return Link(rate_gbit, 0.94, self.loopback_gbps)
        nearest = min(self.link_efficiency, key=lambda r: abs(math.log(float(r) / rate_gbit)))
        return Link(rate_gbit, self.link_efficiency[nearest], self.loopback_gbps)


# Measured on the 2-core dev box (SmolLM2-135M Q4_1, torch on one core as the "GPU node", llama.cpp
# on the other); homelab_disagg/calibration.py replaces it with what a lab's own runs measured.
DEFAULT_CALIBRATION = Calibration(
    PRESETS["smollm2-135m"], "built-in: 2-core dev box, torch on CPU as the GPU node",
    gpu_prefill_ms=Poly(80.0, 3.6, 0.0004), gpu_ttft_ms=Poly(90.0, 3.7, 0.0004), gpu_tpot_ms=Poly(120.0, 0.02, 0.0),
    cpu_prefill_ms=Poly(0.0, 9.0, 0.001), cpu_step_ms=35.0, cpu_seq_ms=4.0, cpu_kv_ms_per_mb=0.4,
    inject_ms_per_mb=0.6, admit_ms=2.0,
)


# --- costs of one model on the calibrated lab ---------------------------------------------------


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    output_tokens: int
    num_requests: int = 0  # 0: max(4, concurrency), what experiment 1 sends per point

    def requests_at(self, concurrency: int) -> int:
        return self.num_requests or max(4, concurrency)


@dataclass(frozen=True)
class Costs:
    """Stage times (ms) for `model` on the calibrated lab, over `link`, with `codec`."""

    cal: Calibration
    model: ModelProfile
    link: Link
    codec: str = "f16"
    layer_streaming: bool = True

    def __post_init__(self):
        if self.codec not in codecs.CODECS:
            raise ConfigError(f"codec {self.codec!r} is not one of {', '.join(codecs.names())}")

    # size ratios against the calibrated model
    @property
    def s_params(self) -> float:
        return self.model.num_params / self.cal.model.num_params

    @property
    def s_attn(self) -> float:
        return self.model.num_layers * self.model.hidden_size / (self.cal.model.num_layers * self.cal.model.hidden_size)

    @property
    def s_layers(self) -> float:
        return self.model.num_layers / self.cal.model.num_layers

    @property
    def s_weights(self) -> float:
        return self.model.weight_bytes / self.cal.model.weight_bytes

    @property
    def cache_type(self) -> str:
        """The decode worker's cache for this codec."""
        return codecs.get_codec(self.codec).default_cache_type

    def _mb(self, tokens: float, cache_type: str = "f16") -> float:
        """MB of the KV of `tokens` in a cache of `cache_type` (f16: also f16 KV on the wire)."""
        return tokens * self.model.kv_cache_bytes_per_token(cache_type) / 1e6

    def gpu_prefill(self, t: int) -> float:
        return self.cal.gpu_prefill_ms.scaled(self.s_layers, self.s_params, self.s_attn)(t)

    def encode(self, t: int) -> float:
        enc = self.cal.encode_ms_per_mb
        return self._mb(t) * enc.get(self.codec, enc["f16"])

    def convert(self, t: int) -> float:
        conv = self.cal.convert_ms_per_mb
        return self._mb(t) * conv.get(self.codec, conv["f16"])

    def inject(self, t: int) -> float:
        return self._mb(t, self.cache_type) * self.cal.inject_ms_per_mb

    def wire_bytes(self, t: int) -> float:
        return t * self.model.kv_bytes_per_token(self.codec)

    def gpu_ttft(self, t: int) -> float:
        return self.cal.gpu_ttft_ms.scaled(self.s_layers, self.s_params, self.s_attn)(t)

    def gpu_tpot(self, ctx: float) -> float:
        return self.cal.gpu_tpot_ms.scaled(self.s_params, self.model.kv_bytes_per_token() / self.cal.model.kv_bytes_per_token(), 0)(ctx)

    def cpu_chunk(self, start: int, k: int) -> float:
        """llama.cpp processing prompt tokens [start, start + k) of one sequence inside a step."""
        p = self.cal.cpu_prefill_ms.scaled(self.s_layers, self.s_params, self.s_attn)
        return p.c1 * k + p.c2 * ((start + k) ** 2 - start**2)

    def cpu_step(self, num_seqs: int, kv_tokens: float, cache: str) -> float:
        """One llama.cpp step: weights once, per-sequence work, every running sequence's KV read."""
        return (self.cal.cpu_step_ms * self.s_weights + self.cal.cpu_seq_ms * self.s_params * num_seqs
                + self.cal.cpu_kv_ms_per_mb * self._mb(kv_tokens, cache))

    def transfer(self, t_start: float, tokens: int, compute_ms: float, link_free: float) -> tuple[float, float]:
        """KV of `tokens` whose forward pass (with encoding) runs [t_start, t_start + compute_ms):
        (time its last layer is in at the decode worker, time the link is free again). Layer i is
        ready at (i + 1) / L of the pass with streaming, all at its end without; the link moves
        layers one at a time at its goodput."""
        n = self.model.num_layers
        layer_ms = self.wire_bytes(tokens) / n / self.link.goodput_bytes_per_ms
        end = link_free
        for i in range(n):
            ready = t_start + compute_ms * ((i + 1) / n if self.layer_streaming else 1.0)
            end = max(end, ready) + layer_ms
        return end, end

    def exposed_transfer(self, tokens: int) -> float:
        """What the transfer adds after the forward pass on an idle link (ms)."""
        compute = self.gpu_prefill(tokens) + self.encode(tokens)
        return self.transfer(0.0, tokens, compute, 0.0)[0] - compute


# --- simulation ----------------------------------------------------------------------------------


@dataclass
class _Req:
    idx: int
    prompt: int
    output: int
    route: str  # "disaggregated", "cpu" (llama.cpp alone) or "gpu" (torch alone)
    t_issue: float = 0.0
    t_first: float = -1.0
    t_done: float = 0.0
    done_prompt: int = 0  # llama.cpp local prefill progress
    generated: int = 0
    convert_ms: float = 0.0

    @property
    def ctx(self) -> int:
        return self.prompt + self.generated


class _Lab:
    """The two nodes as queues: the GPU node serves one request at a time (FIFO); the CPU node runs
    the decode worker's loop (control -> KV frames -> place -> one batched step); one link. When
    both nodes compute at once each runs at `overlap_speed` of its solo speed (1.0 for two hosts;
    less for two halves of one box whose cores share a physical core or memory)."""

    def __init__(self, costs: Costs, slots: int):
        self.c, self.slots = costs, slots
        self.overlap_speed = costs.cal.node_overlap_speed
        self.now, self._last = 0.0, 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.jobs: dict = {"gpu": None, "cpu": None}  # node -> [work left in solo ms, version, then]
        self.gpu_queue: deque = deque()
        self.gpu_blocked = False  # computing, or flushing the last request's KV sends
        self.link_free = 0.0
        self.admits: deque = deque()
        self.kv_in: deque = deque()
        self.ready: deque = deque()
        self.running: list = []
        self.prefilling: list = []
        self.busy_ms = {"gpu": 0.0, "cpu": 0.0}
        self.on_done = None

    def at(self, t: float, fn) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def run(self) -> None:
        while self._events:
            t, _, fn = heapq.heappop(self._events)
            self._advance(t)
            fn()

    # --- processor sharing between the nodes ----------------------------------------------
    def _rate(self) -> float:
        return self.overlap_speed if all(self.jobs.values()) else 1.0

    def _advance(self, t: float) -> None:
        rate = self._rate()
        for node, job in self.jobs.items():
            if job:
                job[0] -= (t - self._last) * rate
                self.busy_ms[node] += t - self._last
        self.now = self._last = t

    def _start(self, node: str, work_ms: float, then) -> None:
        self.jobs[node] = [work_ms, 0, then]
        self._reschedule()

    def _reschedule(self) -> None:
        rate = self._rate()
        for node, job in self.jobs.items():
            if job:
                job[1] += 1
                self.at(self.now + max(job[0], 0.0) / rate, lambda node=node, v=job[1]: self._finish(node, v))

    def _finish(self, node: str, version: int) -> None:
        job = self.jobs[node]
        if job is None or job[1] != version:
            return  # superseded: the other node started or stopped since
        self.jobs[node] = None
        self._reschedule()
        job[2]()

    # --- requests -------------------------------------------------------------------------
    def issue(self, r: _Req) -> None:
        r.t_issue = self.now
        if r.route == "gpu":
            self.gpu_queue.append(r)
            self._gpu_kick()
        else:
            self.admits.append(r)
            self._cpu_kick()

    def _admitted(self, r: _Req) -> None:
        if r.route == "cpu" or r.prompt <= 1:
            self.ready.append(r)
            self._cpu_kick()
            return
        self.gpu_queue.append(r)
        self._gpu_kick()

    # --- GPU node ---------------------------------------------------------------------------
    def _gpu_kick(self) -> None:
        if self.gpu_blocked or not self.gpu_queue:
            return
        r = self.gpu_queue.popleft()
        self.gpu_blocked, start = True, self.now
        if r.route == "gpu":  # torch alone: prefill + first token, then greedy steps
            decode = sum(self.c.gpu_tpot(r.prompt + i) for i in range(1, r.output))

            def first_token():
                r.t_first = self.now
                self._start("gpu", decode, generated)

            def generated():
                r.generated, r.t_done, self.gpu_blocked = r.output, self.now, False
                self.on_done(r)
                self._gpu_kick()

            self._start("gpu", self.c.gpu_ttft(r.prompt), first_token)
            return
        tokens = r.prompt - 1  # the decode worker decodes the last prompt token itself

        def computed():
            arrive, self.link_free = self.c.transfer(start, tokens, self.now - start, self.link_free)
            self.at(arrive, lambda: self._kv_arrived(r))
            self.at(arrive, self._gpu_unblock)  # the worker flushes its sends before the next request

        self._start("gpu", self.c.gpu_prefill(tokens) + self.c.encode(tokens), computed)

    def _gpu_unblock(self) -> None:
        self.gpu_blocked = False
        self._gpu_kick()

    # --- CPU node ---------------------------------------------------------------------------
    def _kv_arrived(self, r: _Req) -> None:
        # frames are converted as they arrive while the loop idles, between steps while it decodes
        full = self.c.convert(r.prompt - 1)
        r.convert_ms = full if self.jobs["cpu"] else full / self.c.model.num_layers
        self.kv_in.append(r)
        self._cpu_kick()

    def _cpu_kick(self) -> None:
        if self.jobs["cpu"] or not (self.admits or self.kv_in or self.ready or self.running or self.prefilling):
            return
        work = 0.0
        while self.admits:
            work += self.c.cal.admit_ms
            r = self.admits.popleft()
            self.at(self.now + work, lambda r=r: self._admitted(r))
        while self.kv_in:
            r = self.kv_in.popleft()
            work += r.convert_ms
            self.ready.append(r)
        free = self.slots - len(self.running) - len(self.prefilling)
        while self.ready and free > 0:
            r = self.ready.popleft()
            free -= 1
            if r.route == "cpu":
                self.prefilling.append(r)
            else:
                work += self.c.inject(r.prompt - 1)
                r.done_prompt = r.prompt - 1
                self.running.append(r)
        running, chunks, budget = list(self.running), [], N_BATCH - len(self.running)
        step = 0.0
        for r in list(self.prefilling):
            if budget <= 0:
                break
            k = min(r.prompt - r.done_prompt, budget)
            step += self.c.cpu_chunk(r.done_prompt, k)
            chunks.append((r, k))
            budget -= k
        emitting = len(running) + sum(1 for r, k in chunks if r.done_prompt + k == r.prompt)
        if running or chunks:
            step += self.c.cpu_step(max(1, emitting), sum(r.ctx for r in running), self.c.cache_type)
        self._start("cpu", work + step, lambda: self._stepped(running, chunks))

    def _stepped(self, running: list, chunks: list) -> None:
        finished = []
        for r, k in chunks:
            r.done_prompt += k
            if r.done_prompt == r.prompt:
                self.prefilling.remove(r)
                self.running.append(r)
                running.append(r)
        for r in running:
            if r.generated == 0:
                r.t_first = self.now
            r.generated += 1
            if r.generated >= r.output:
                finished.append(r)
        for r in finished:
            self.running.remove(r)
            r.t_done = self.now
            self.on_done(r)
        self._cpu_kick()


@dataclass(frozen=True)
class Prediction:
    architecture: str
    concurrency: int
    ttft_ms: float  # median
    tpot_ms: float  # median
    e2e_ms: float  # median
    output_tok_s: float
    request_s: float
    gpu_busy: float  # fraction of the run each node was busy
    cpu_busy: float
    requests: int = 0  # completed


def simulate(costs: Costs, arch: str, workload: Workload, concurrency: int, slots: int = 32) -> Prediction:
    """N requests (workload.requests_at(C)), at most C in flight, each issued when one finishes."""
    if arch not in ARCHS:
        raise ConfigError(f"architecture {arch!r} is not one of {', '.join(ARCHS)}")
    lab = _Lab(costs, slots)
    n = workload.requests_at(concurrency)
    # replicated: round-robin over [llama.cpp on the CPU node, torch on the GPU node]; the
    # experiments' warm-up request takes the first turn, so measured requests start on the GPU node
    route = {"single-cpu": lambda i: "cpu", "single-gpu": lambda i: "gpu", "disaggregated": lambda i: "disaggregated",
             "replicated": lambda i: ("gpu", "cpu")[i % 2]}[arch]
    todo = deque(_Req(i, workload.prompt_tokens, workload.output_tokens, route(i)) for i in range(n))
    done: list[_Req] = []

    def finished(r: _Req) -> None:
        done.append(r)
        if todo:
            lab.issue(todo.popleft())

    lab.on_done = finished
    for _ in range(min(concurrency, n)):
        lab.at(0.0, lambda: lab.issue(todo.popleft()))
    lab.run()
    wall = max(r.t_done for r in done)
    tpots = [(r.t_done - r.t_first) / (r.output - 1) for r in done if r.output > 1]
    return Prediction(
        arch, concurrency, statistics.median(r.t_first - r.t_issue for r in done),
        statistics.median(tpots) if tpots else 0.0, statistics.median(r.t_done - r.t_issue for r in done),
        sum(r.output for r in done) / wall * 1e3, len(done) / wall * 1e3,
        min(1.0, lab.busy_ms["gpu"] / wall), min(1.0, lab.busy_ms["cpu"] / wall), len(done),
    )


# --- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    model: ModelProfile
    link: Link
    codec: str
    workload: Workload
    predictions: tuple[Prediction, ...]
    crossover: int | None  # lowest concurrency from which disaggregated out-serves replicated; None: never
    recommendation: str  # an architecture name
    reasons: tuple[str, ...]

    def at(self, arch: str, concurrency: int) -> Prediction:
        return next(p for p in self.predictions if p.architecture == arch and p.concurrency == concurrency)


def find_crossover(preds: list[Prediction], concurrencies) -> int | None:
    """The lowest concurrency from which disaggregated throughput stays above replicated's."""
    by = {(p.architecture, p.concurrency): p for p in preds}
    wins = [by[("disaggregated", c)].output_tok_s > by[("replicated", c)].output_tok_s for c in concurrencies]
    for i, c in enumerate(concurrencies):
        if all(wins[i:]):
            return c
    return None


def make_plan(cal: Calibration, model: ModelProfile, rate_gbit: float | None, workload: Workload, codec: str = "f16",
              concurrency: int = 8, concurrencies=CONCURRENCIES, layer_streaming: bool = True) -> Plan:
    link = cal.link(rate_gbit)
    costs = Costs(cal, model, link, codec, layer_streaming)
    concurrencies = tuple(sorted(set(concurrencies) | {concurrency}))
    preds = [simulate(costs, a, workload, c) for c in concurrencies for a in ARCHS]
    crossover = find_crossover(preds, concurrencies)
    best, reasons = _recommend(costs, workload, preds, concurrency, crossover)
    return Plan(model, link, codec, workload, tuple(preds), crossover, best, tuple(reasons))


def _recommend(costs: Costs, w: Workload, preds: list[Prediction], c: int, crossover: int | None):
    by = {p.architecture: p for p in preds if p.concurrency == c}
    single = max(("single-cpu", "single-gpu"), key=lambda a: by[a].output_tok_s)
    dis, rep = by["disaggregated"], by["replicated"]
    best = max((single, "replicated", "disaggregated"), key=lambda a: by[a].output_tok_s)
    t = w.prompt_tokens
    kv_mb = costs.wire_bytes(t) / 1e6
    whole = costs.wire_bytes(t) / costs.link.goodput_bytes_per_ms
    gain = costs.cal.cpu_prefill_ms.scaled(costs.s_layers, costs.s_params, costs.s_attn)(t) - costs.gpu_prefill(t)
    handoff = costs.encode(t) + costs.exposed_transfer(t) + costs.convert(t) / costs.model.num_layers + costs.inject(t)
    reasons = [
        f"at concurrency {c}: {best} serves {by[best].output_tok_s:.1f} output tok/s "
        f"(disaggregated {dis.output_tok_s:.1f}, replicated {rep.output_tok_s:.1f}, {single} {by[single].output_tok_s:.1f}); "
        f"median TTFT {by[best].ttft_ms:.0f} ms, TPOT {by[best].tpot_ms:.1f} ms",
        f"KV of one {t}-token prompt: {kv_mb:.1f} MB in {costs.codec}; over {costs.link.label} "
        f"({costs.link.goodput_bytes_per_ms * 8e3 / 1e9:.2f} Gbit/s goodput) {whole:.0f} ms whole, "
        f"{costs.exposed_transfer(t):.1f} ms exposed after the forward pass with{'' if costs.layer_streaming else 'out'} layer streaming",
        f"prefill on the GPU node instead of llama.cpp saves {gain:.0f} ms per request; the hand-off "
        f"(encode, exposed wire, convert, inject) costs {handoff:.0f} ms: specialization "
        f"{'pays' if gain > handoff else 'does not pay'} for TTFT",
        f"disaggregated keeps the GPU node busy {dis.gpu_busy * 100:.0f}% and the CPU node {dis.cpu_busy * 100:.0f}%: "
        + ("the GPU node (prefill) is its bottleneck" if dis.gpu_busy >= dis.cpu_busy else "the CPU node (decode) is its bottleneck")
        + f"; replicated keeps them {rep.gpu_busy * 100:.0f}% / {rep.cpu_busy * 100:.0f}%",
        ("disaggregated out-serves replicated from concurrency " + str(crossover) if crossover is not None
         else "disaggregated never out-serves replicated in 1..32 concurrent requests: no crossover"),
    ]
    if costs.model.num_params < 7e9:
        reasons.append(f"{costs.model.name} is small (< 7B, §11.3): prefill is already fast, little to gain from separation")
    if costs.link.rate_gbit is not None and costs.link.rate_gbit < 10:
        reasons.append(f"the link is slow (< 10 Gbit, §11.3): whole-request KV transfers cost {whole:.0f} ms")
    return best, reasons


def render(plan: Plan) -> list[dict]:
    """Rows for a table: one per (concurrency, architecture)."""
    return [{"concurrency": p.concurrency, "architecture": p.architecture, "ttft_ms": p.ttft_ms, "tpot_ms": p.tpot_ms,
             "e2e_ms": p.e2e_ms, "output_tok_s": p.output_tok_s, "request_s": p.request_s,
             "gpu_busy": p.gpu_busy, "cpu_busy": p.cpu_busy} for p in plan.predictions]
