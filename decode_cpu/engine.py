"""The CPU decode engine: one llama.cpp context, many sequence slots, one batched step at a time.

    admit -> (KV frames assembled | local prefill) -> step, step, ... -> finish (cells freed at once)

Every `step` decodes one token for each running sequence in a single `llama_decode` call, plus
(if any) a chunk of a local prefill, so new sequences join the running batch the step after
their KV lands. The first output token comes from llama.cpp itself: the prefill side ships the
KV of all prompt tokens but the last, and the first step decodes that last token here, so the
request's own sampler (temperature, seed, ...) picks every output token including the first.
Unless the request was admitted with its first token from the prefill worker (greedy requests,
`first_token_from_prefill`): then the KV covers every prompt token, the token arrives on its own
(`accept_first_token`, streamed at once, usually before the KV's last layer), and the first step
decodes from it. The sequence runs once it has both.
With a KV pool (kv_pool.py, `kv_pool_bytes`), a finished sequence's cells are copied out before its
slot is freed, and a request whose prompt starts with a pooled prefix is admitted to prefill here:
its slot gets the pooled cells (trimmed to the shared prefix) and llama.cpp prefills only the rest,
so the coordinator sends no Prefill (Admitted.kv_source "local", Admitted.cached_tokens).
Greedy rows are an argmax over llama.cpp's logits (what its greedy sampler does, without building
a candidate array per row); other rows go through a llama.cpp sampler chain of their own.
Rows go in slot order and held slots stay a prefix 0..n-1 (slots.py), because llama.cpp (one KV
stream per sequence) runs a batch as one micro-batch only over consecutive sequence ids.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from decode_cpu import kv_assembler, llama, numa
from decode_cpu.kv_assembler import Geometry
from decode_cpu.kv_pool import Hit, KVPool, auto_budget_bytes
from decode_cpu.kv_state import StateLayout, StateLayoutError, parse_state
from decode_cpu.output_text import OutputText
from decode_cpu.slots import SlotTable
from homelab_disagg.config import KV_POOL_AUTO, DecodeWorkerConfig
from homelab_disagg.errors import PromptTooLong, RequestError
from homelab_disagg.model import ModelInfo
from wire import frame
from wire.messages import Sampling

WAIT_KV, READY, PREFILL, RUNNING, DONE = "wait_kv", "ready", "prefill", "running", "done"


@dataclass
class Sequence:
    request_id: bytes
    prompt_ids: list[int]
    sampling: Sampling
    state: str
    owner: bytes = b""  # the coordinator's socket identity, for routing output back
    slot: int = -1
    sampler: llama.Sampler | None = None  # None: greedy (argmax)
    first_from_prefill: bool = False  # KV of every prompt token; the first output token comes from outside
    n_past: int = 0  # cells of this sequence in the cache
    next_token: int = -1  # token to feed at position n_past in the next step
    output_ids: list[int] = field(default_factory=list)
    out: OutputText = field(default_factory=OutputText)
    assembly: kv_assembler.Assembly | None = None  # the KV layers landed so far, while WAIT_KV
    state_buf: bytearray | None = None  # the whole KV state, from its last layer until injected
    pool_hit: Hit | None = None  # pooled KV of a prompt prefix, from admission until restored into the slot
    num_cached: int = 0  # leading prompt tokens whose KV came from the pool (not prefilled)
    # after a restore the rest's first token goes alone: a multi-token chunk right after
    # llama_state_seq_set_data gave other logits (the first output token off) in a fresh context;
    # one token first did not (docs/decisions.md, "Conversations": not the whole story yet)
    is_restored: bool = False
    t_admit_s: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.out.text


@dataclass(frozen=True)
class StepOutput:
    seq: Sequence
    token_id: int
    piece: str
    finish_reason: str | None  # None while the sequence goes on; "stop", "length" or "error"
    error: str = ""  # with finish_reason "error": why (the sequence produced no token this step)


class DecodeEngine:
    def __init__(self, cfg: DecodeWorkerConfig, info: ModelInfo, n_threads: int, numa_strategy: int = llama.NUMA_OFF):
        self.cfg, self.info = cfg, info
        llama.init_backend(numa_strategy)  # before the model loads: llama.cpp reads the binding once
        self.model = llama.LlamaModel(info.path, use_mmap=cfg.numa_node is None)
        self.ctx = llama.LlamaContext(
            self.model,
            llama.ContextParams(
                n_ctx=cfg.slot_ctx_tokens * cfg.num_slots,
                n_seq_max=cfg.num_slots,
                n_batch=max(512, cfg.num_slots),
                n_threads=n_threads,
                type_k=cfg.kv_cache_type,
                type_v=cfg.kv_cache_type,
                flash_attn=cfg.flash_attn,
            ),
        )
        self.n_threads = n_threads
        self.batch = llama.Batch(self.ctx.params.n_batch)
        self.slots = SlotTable(cfg.num_slots, cfg.max_queue)
        self.seqs: dict[bytes, Sequence] = {}  # every live request: waiting, prefilling or running
        self.running: dict[int, Sequence] = {}  # slot -> sequence decoding one token per step
        self.prefilling: dict[int, Sequence] = {}  # slot -> sequence feeding its prompt (local prefill)
        self._ready: deque[bytes] = deque()  # KV landed or local prefill asked, waiting for a slot
        self.geometry = Geometry(
            info.fingerprint, info.num_layers, info.kv_row_elems, cfg.kv_cache_type, self.ctx.n_stream, info.head_dim
        )
        self.num_finished = 0
        budget = cfg.kv_pool_bytes if cfg.kv_pool_bytes != KV_POOL_AUTO else auto_budget_bytes(
            numa.node_memory_bytes(cfg.numa_node))
        self.pool = KVPool(budget) if budget > 0 else None

    # --- admission ------------------------------------------------------------------------

    def tokenize_request(self, prompt: str | None, chat: list | None, token_ids: list | None) -> list[int]:
        if token_ids:
            ids = [int(t) for t in token_ids]
            if min(ids) < 0 or max(ids) >= self.model.n_vocab:
                raise RequestError(f"token ids must be in 0..{self.model.n_vocab - 1}")
            return ids
        if chat is not None:
            return self.model.tokenize(self.model.apply_chat_template(chat), add_special=True, parse_special=True)
        if prompt is None or prompt == "":
            raise RequestError("the request has no prompt")
        return self.model.tokenize(prompt, add_special=True, parse_special=False)

    def detokenize(self, token_ids: list[int], stop=()) -> tuple[list[str], list[bool]]:
        """Pieces per token for tokens sampled elsewhere, by the text rules of this engine's own
        output (an incomplete UTF-8 tail moves to the next token's piece; a stop string and what
        follows it are cut), and whether generation ends at each: both lists stop at the first
        end-of-generation token or the token that completes a stop string."""
        if any(not 0 <= t < self.model.n_vocab for t in token_ids):
            raise RequestError(f"token ids must be in 0..{self.model.n_vocab - 1}")
        pieces, is_eog, text = [], [], OutputText(stop)
        for tok in token_ids:
            if self.model.is_eog(tok):
                pieces.append(text.flush())
                is_eog.append(True)
                return pieces, is_eog
            piece, stopped = text.add(self.model.token_bytes(tok))
            pieces.append(piece)
            is_eog.append(stopped)
            if stopped:
                return pieces, is_eog
        if pieces:
            pieces[-1] += text.flush()
        return pieces, is_eog

    def admit(self, request_id: bytes, prompt_ids: list[int], sampling: Sampling, local_prefill: bool, owner=b"",
              first_from_prefill: bool = False) -> Sequence:
        if request_id in self.seqs:
            raise RequestError("request id is already in use on this decode worker")
        if not prompt_ids:
            raise RequestError("the request has no prompt tokens")
        if len(prompt_ids) + 1 > self.ctx.n_ctx_seq:
            raise PromptTooLong(
                f"prompt of {len(prompt_ids)} tokens does not fit a decode slot of {self.ctx.n_ctx_seq} tokens; "
                "shorten it or start the decode worker with a larger --slot-ctx"
            )
        if sampling.max_tokens < 1:
            raise RequestError("max_tokens must be >= 1")
        if sampling.max_tokens >= self.ctx.n_ctx_seq:  # never met, whatever the prompt: no slot held for it
            raise PromptTooLong(
                f"max_tokens {sampling.max_tokens} does not fit a decode slot of {self.ctx.n_ctx_seq} tokens, prompt "
                f"included (this prompt leaves room for {self.ctx.n_ctx_seq - len(prompt_ids)}); lower max_tokens or "
                "start the decode worker with a larger --slot-ctx"
            )
        if sampling.temperature > 0 and not (sampling.top_k >= 0 and 0.0 < sampling.top_p <= 1.0):
            raise RequestError("top_k must be >= 0 and top_p in (0, 1]")
        self.slots.check_capacity(len(self.seqs))
        if first_from_prefill and sampling.temperature > 0:
            raise RequestError("only a greedy request (temperature 0) may take its first token from the prefill worker")
        seq = Sequence(request_id, prompt_ids, sampling, WAIT_KV, owner, out=OutputText(sampling.stop))
        seq.pool_hit = self._pool_hit(prompt_ids, local_prefill)
        self.seqs[request_id] = seq
        if local_prefill or len(prompt_ids) == 1 or seq.pool_hit is not None:
            seq.state = PREFILL  # with a pool hit: the prefix is restored, llama.cpp prefills the rest here
            seq.num_cached = seq.pool_hit.num_tokens if seq.pool_hit is not None else 0
            self._ready.append(request_id)
        else:
            seq.first_from_prefill = first_from_prefill
        return seq

    def _pool_hit(self, prompt_ids: list[int], local_prefill: bool) -> Hit | None:
        """The pooled prefix this request starts from, or None: no pool, no entry, a rest too long to
        prefill here when a prefill worker would compute the whole prompt, or an entry that fails its
        check (dropped; the request is prefilled in full)."""
        if self.pool is None or len(prompt_ids) < 2:
            return None
        hit = self.pool.lookup(prompt_ids, len(prompt_ids) - 1)  # the last token is decoded, never restored
        if hit is None or (not local_prefill and len(prompt_ids) - hit.num_tokens > self.cfg.kv_pool_max_local_rest):
            return None
        if not self.pool.check(hit.entry):
            self.pool.drop(hit.entry)
            return None
        self.pool.count_hit(hit)
        return hit

    # --- waiting for KV: a sequence in WAIT_KV holds its partial assembly; release drops both ---

    def add_kv_frame(self, h: frame.FrameHeader, k_payload, v_payload) -> None:
        """Place one layer of a waiting sequence's KV stream; its last layer makes the sequence ready.
        Frames for a request that waits for no KV (cancelled, failed, unknown) are dropped quietly.
        Raises a named FrameError (or CodecError, ValueError) for a frame this sequence cannot use:
        the caller cancels the request."""
        seq = self.seqs.get(h.request_id)
        if seq is None or seq.state != WAIT_KV:
            return
        if h.kind == frame.KIND_ABORT:
            raise frame.FrameError("the prefill worker aborted this request's KV stream")
        asm = seq.assembly
        if asm is None:
            if h.num_tokens != self.expected_kv_tokens(seq):
                raise frame.GeometryMismatch(
                    f"KV stream carries {h.num_tokens} tokens, the admitted prompt needs {self.expected_kv_tokens(seq)}"
                )
            asm = seq.assembly = kv_assembler.start_assembly(self.geometry, h)
        kv_assembler.add_layer(self.geometry, asm, h, k_payload, v_payload)
        if asm.complete:
            seq.assembly = None
            seq.timings["kv_bytes_wire"] = asm.bytes_wire
            self.kv_landed(seq, asm.buf, asm.first_frame_s, asm.last_frame_s)

    def kv_landed(self, seq: Sequence, state_buf: bytearray, t_first_frame_s: float, t_last_frame_s: float) -> None:
        """The whole KV state of a waiting sequence is in (from add_kv_frame, or built elsewhere)."""
        seq.state_buf, seq.state = state_buf, READY
        seq.timings["kv_wait_ms"] = (t_last_frame_s - seq.t_admit_s) * 1e3
        seq.timings["kv_recv_ms"] = (t_last_frame_s - t_first_frame_s) * 1e3
        if not seq.first_from_prefill or seq.output_ids:  # else it waits for its first token
            self._ready.append(seq.request_id)

    def accept_first_token(self, request_id: bytes, token_id: int) -> StepOutput | None:
        """The first output token of a sequence admitted with first_from_prefill, sampled by the
        prefill worker: stream it now (stop strings, EOS and max_tokens apply as to any token) and
        decode from it once the KV is in. None when the request is gone or takes no such token (any
        more); RequestError, with the sequence left as it was, when token_id is not of this model."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        if not 0 <= token_id < self.model.n_vocab:
            raise RequestError(f"first token {token_id} is not a token id of this model")
        if not seq.first_from_prefill or seq.output_ids or seq.state not in (WAIT_KV, READY):
            return None
        out = self._advance(seq, token_id, 0.0)
        if out.finish_reason is not None:
            self.release(seq)
        elif seq.state == READY:
            self._ready.append(seq.request_id)
        return out

    def expected_kv_tokens(self, seq: Sequence) -> int:
        return len(seq.prompt_ids) - (0 if seq.first_from_prefill else 1)

    def expire_stalled_kv(self, now_s: float) -> list[tuple[Sequence, str]]:
        """Release the sequences whose KV stream has been silent for kv_timeout_s (since admission,
        or since its last layer). Returns each with why."""
        expired = []
        for seq in [s for s in self.seqs.values() if s.state == WAIT_KV]:
            asm = seq.assembly
            last = asm.last_frame_s or asm.first_frame_s if asm else seq.t_admit_s
            if now_s - last > self.cfg.kv_timeout_s:
                got = f"{asm.next_layer} of {asm.layout.num_layers} layers" if asm else "no layer"
                self.release(seq)
                expired.append((seq, f"KV stream stalled: {got} arrived within {self.cfg.kv_timeout_s:.0f} s; "
                                     "the prefill worker may have died"))
        return expired

    def cancel(self, request_id: bytes) -> Sequence | None:
        """Drop a request wherever it is: waiting for KV, for a slot, or running. Returns its
        sequence, None when there is none (finished, failed or never admitted)."""
        seq = self.seqs.get(request_id)
        if seq is not None:
            self.release(seq)
        return seq

    # --- the loop's stages ---------------------------------------------------------------

    def place_ready(self) -> list[tuple[Sequence, Exception]]:
        """Give free slots to sequences whose KV landed (inject it) or that prefill locally."""
        failed = []
        while self._ready and self.slots.num_free:
            seq = self.seqs.get(self._ready.popleft())
            if seq is None:  # cancelled while waiting
                continue
            seq.slot = self.slots.acquire()
            if seq.sampling.temperature > 0:
                s = seq.sampling
                seq.sampler = llama.Sampler(s.temperature, s.top_k, s.top_p, s.seed)
            seq.timings["queue_ms"] = (time.perf_counter() - seq.t_admit_s) * 1e3 - seq.timings.get("kv_wait_ms", 0.0)
            if seq.state == PREFILL:
                if seq.pool_hit is not None:
                    self._restore_prefix(seq)
                self.prefilling[seq.slot] = seq
                continue
            try:
                self._inject(seq)
            except (RequestError, ValueError) as e:
                failed.append((seq, e))
                self.release(seq)
        return failed

    def _restore_prefix(self, seq: Sequence) -> None:
        """Copy the pooled entry's cells into the sequence's slot and keep the shared prefix; the
        prompt's rest is prefilled from there. A state llama.cpp refuses drops the entry, and the
        sequence prefills its whole prompt."""
        hit, seq.pool_hit = seq.pool_hit, None
        t0 = time.perf_counter()
        n = hit.num_tokens
        if (self.ctx.set_seq_state(seq.slot, hit.entry.state) == 0 or not self.ctx.seq_trim(seq.slot, n)
                or self.ctx.seq_pos_max(seq.slot) != n - 1):
            self.ctx.seq_rm(seq.slot)
            self.pool.drop(hit.entry)
            n = 0
        seq.n_past = seq.num_cached = n
        seq.is_restored = n > 0
        seq.timings["pool_restore_ms"] = (time.perf_counter() - t0) * 1e3

    def _pool_put(self, seq: Sequence) -> None:
        """Keep a finished sequence's KV: its cells hold the prompt and every output token but the last."""
        n = seq.n_past
        if n < self.pool.min_tokens or self.ctx.seq_pos_max(seq.slot) != n - 1:
            return
        t0 = time.perf_counter()
        self.pool.put((seq.prompt_ids + seq.output_ids)[:n], self.ctx.copy_seq_state(seq.slot))
        seq.timings["pool_store_ms"] = (time.perf_counter() - t0) * 1e3

    def _inject(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        n_cells = self.expected_kv_tokens(seq)
        self._check_state(seq.state_buf, n_cells)
        if self.ctx.set_seq_state(seq.slot, seq.state_buf) == 0:
            raise RequestError("llama.cpp rejected the KV state (type, layer count or layout mismatch)")
        if self.ctx.seq_pos_max(seq.slot) != n_cells - 1:
            raise RequestError(f"injected KV holds positions up to {self.ctx.seq_pos_max(seq.slot)}, expected {n_cells - 1}")
        seq.state_buf = None
        if not seq.first_from_prefill:  # else next_token is already the first output token
            seq.next_token = seq.prompt_ids[-1]
        seq.n_past, seq.state = n_cells, RUNNING
        self.running[seq.slot] = seq
        seq.timings["inject_ms"] = (time.perf_counter() - t0) * 1e3

    def _check_state(self, buf, n_cells: int) -> None:
        """A state buffer must be exactly what this context would write for n_cells cells at
        positions 0..n_cells-1; anything else is refused here, naming the difference, before
        llama.cpp sees it (stray positions would break the next batched step for every sequence)."""
        try:
            got = parse_state(buf)
        except StateLayoutError as e:
            raise RequestError(f"KV state is malformed: {e}") from None
        g = self.geometry
        want = StateLayout.for_cache(g.n_stream, n_cells, g.num_layers, g.row_elems, g.cache_type)
        for name in ("n_stream", "num_cells", "num_layers", "k_type", "v_type", "k_row_bytes", "v_row_bytes"):
            if getattr(got.layout, name) != getattr(want, name):
                raise RequestError(
                    f"KV state has {name} {getattr(got.layout, name)}, this decode worker needs {getattr(want, name)} "
                    f"({g.num_layers} layers, {g.cache_type} cache, {g.n_stream} streams, {n_cells} cells)"
                )
        if not np.array_equal(got.positions, np.arange(n_cells)):
            raise RequestError(f"KV state cells must hold positions 0..{n_cells - 1}")

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling)

    @property
    def num_free_slots(self) -> int:
        return self.slots.num_free

    @property
    def num_queued(self) -> int:
        """Admitted requests holding no slot yet: waiting for their KV, their first token or a slot."""
        return len(self.seqs) - self.slots.num_held

    def step(self) -> list[StepOutput]:
        """One llama_decode over all running sequences (+ local prefill chunks). Returns tokens."""
        if not self.running and not self.prefilling:
            return []
        self._compact()
        entries = self._fill_batch()
        t0 = time.perf_counter()
        try:
            self.ctx.decode(self.batch)
        except RuntimeError as e:
            return self._fail_all([s for s, _, _ in entries], str(e))
        step_ms = (time.perf_counter() - t0) * 1e3
        return self._collect(entries, step_ms)

    def _compact(self) -> None:
        """Move sequences down into holes that no waiting request will fill (see slots.py: each
        run of consecutive slots costs llama.cpp a pass over the weights). A move copies the
        sequence's used cells through its state: exact, and paid once per hole, not per step."""
        while self.slots.num_holes > self.num_queued:  # queued ones take the lowest holes when placed
            src, dst = self.slots.next_move()
            table = self.running if src in self.running else self.prefilling
            seq = table[src]
            if seq.n_past and not self.ctx.move_seq(src, dst):
                return  # stay fragmented: slower, still correct
            self.slots.move(src, dst)
            table[dst] = table.pop(src)
            seq.slot = dst

    def _fill_batch(self) -> list[tuple[Sequence, int, bool]]:
        """Rows in slot order (llama.cpp splits a batch where sequence ids stop being consecutive):
        one token per running sequence, a chunk of each local prefill. Returns (seq, tokens fed,
        emits a token) per sequence in row order; rows that emit are the only ones with logits."""
        b = self.batch
        if not self.prefilling:  # the common step: vectorized
            running = [self.running[k] for k in sorted(self.running)]
            n = len(running)
            b.token[:n] = [s.next_token for s in running]
            b.pos[:n] = [s.n_past for s in running]
            b.seq_id[:n] = [s.slot for s in running]
            b.logits[:n] = 1
            b.raw.n_tokens = n
            return [(s, 1, True) for s in running]
        budget = b.capacity - len(self.running)
        entries, n = [], 0
        for slot in sorted(self.running.keys() | self.prefilling.keys()):
            s = self.running.get(slot)
            if s is not None:
                b.token[n], b.pos[n], b.seq_id[n], b.logits[n] = s.next_token, s.n_past, slot, 1
                entries.append((s, 1, True))
                n += 1
                continue
            s = self.prefilling[slot]
            todo = len(s.prompt_ids) - s.n_past
            k = min(todo, budget, 1 if s.is_restored else budget)
            s.is_restored = False
            if k <= 0:
                continue
            b.token[n : n + k] = s.prompt_ids[s.n_past : s.n_past + k]
            b.pos[n : n + k] = np.arange(s.n_past, s.n_past + k)
            b.seq_id[n : n + k] = slot
            b.logits[n : n + k] = 0
            b.logits[n + k - 1] = k == todo
            entries.append((s, k, k == todo))
            n += k
            budget -= k
        b.raw.n_tokens = n
        return entries

    def _collect(self, entries, step_ms: float) -> list[StepOutput]:
        emitting = []
        for s, k, emits in entries:
            s.n_past += k
            if s.state == PREFILL:
                if not emits:
                    s.timings["local_prefill_ms"] = s.timings.get("local_prefill_ms", 0.0) + step_ms
                    continue
                del self.prefilling[s.slot]
                s.state = RUNNING
                self.running[s.slot] = s
                s.timings.setdefault("local_prefill_ms", 0.0)
            emitting.append(s)
        if not emitting:
            return []
        tokens = self._sample(emitting)
        outputs = [self._advance(s, tok, step_ms) for s, tok in zip(emitting, tokens)]
        for o in outputs:
            if o.finish_reason is not None:
                self.release(o.seq, keep_kv=True)  # cells and slot free now, before the next step
        return outputs

    def _sample(self, emitting: list[Sequence]) -> list[int]:
        """One token per emitting sequence; output row i of the logits belongs to emitting[i]."""
        logits = self.ctx.output_logits(len(emitting))  # [n_out, n_vocab] float32 view
        if all(s.sampler is None for s in emitting):
            return logits.argmax(axis=1).tolist()
        # a llama.cpp sampler addresses logits by batch row; rows asking for logits are in emitting order
        rows = np.flatnonzero(self.batch.logits[: self.batch.num_tokens]).tolist()
        return [int(logits[i].argmax()) if s.sampler is None else s.sampler.sample(self.ctx, row)
                for i, (s, row) in enumerate(zip(emitting, rows))]

    def _advance(self, s: Sequence, tok: int, step_ms: float) -> StepOutput:
        if not s.output_ids:
            s.timings["first_step_ms"] = step_ms
            s.timings["t_first_token_s"] = time.perf_counter()
        s.output_ids.append(tok)
        s.next_token = tok
        if self.model.is_eog(tok) and not s.sampling.ignore_eos:
            return StepOutput(s, tok, s.out.flush(), "stop")
        piece, stopped = s.out.add(self.model.token_bytes(tok))
        if stopped:
            return StepOutput(s, tok, piece, "stop")
        if len(s.output_ids) >= s.sampling.max_tokens or s.n_past >= self.ctx.n_ctx_seq:
            return StepOutput(s, tok, piece + s.out.flush(), "length")
        return StepOutput(s, tok, piece, None)

    def _fail_all(self, seqs: list[Sequence], why: str) -> list[StepOutput]:
        outputs = [StepOutput(s, -1, "", "error", f"decode step failed: {why}") for s in seqs]
        for s in seqs:
            self.release(s)
        return outputs

    def timings_of(self, seq: Sequence) -> dict:
        """A finished sequence's figures for Finished (ms, bytes): its stages, decode_ms from its
        first output token to now, and tpot_ms per output token after the first."""
        t, now_s = dict(seq.timings), time.perf_counter()
        first_s = t.pop("t_first_token_s", now_s)
        num_out = len(seq.output_ids)
        t["decode_ms"] = (now_s - first_s) * 1e3
        t["tpot_ms"] = t["decode_ms"] / (num_out - 1) if num_out > 1 else 0.0
        return t

    def release(self, seq: Sequence, keep_kv: bool = False) -> None:
        """Free everything the sequence holds, at once; with `keep_kv` (it finished), its KV goes
        to the pool first. Releasing twice is a no-op."""
        if self.seqs.pop(seq.request_id, None) is None:
            return
        if seq.slot >= 0:
            if keep_kv and self.pool is not None and seq.state == RUNNING:
                self._pool_put(seq)
            self.running.pop(seq.slot, None)
            self.prefilling.pop(seq.slot, None)
            self.ctx.seq_rm(seq.slot)
            self.slots.release(seq.slot)
            seq.slot = -1
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        seq.state, seq.assembly, seq.state_buf, seq.pool_hit = DONE, None, None, None
        self.num_finished += 1

    def close(self) -> None:
        for seq in list(self.seqs.values()):
            self.release(seq)
        self.batch.close()
        self.ctx.close()
        self.model.close()
