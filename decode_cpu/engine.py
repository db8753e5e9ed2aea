"""The CPU decode engine: one llama.cpp context, many sequence slots, one batched step at a time.

    admit -> (KV injected | local prefill) -> step, step, ... -> finish

Every `step` decodes one token for each running sequence in a single `llama_decode` call, plus
(if any) a chunk of a local prefill, so new sequences join the running batch the step after
their KV lands. The first output token comes from llama.cpp itself: the prefill side ships the
KV of all prompt tokens but the last, and the first step decodes that last token here, so the
request's own sampler (temperature, seed, ...) picks every output token including the first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from decode_cpu import llama
from decode_cpu.kv_assembler import Geometry
from decode_cpu.slots import SlotTable
from homelab_disagg.config import DecodeWorkerConfig
from homelab_disagg.errors import RequestError
from homelab_disagg.model import ModelInfo
from wire.messages import Sampling

WAIT_KV, READY, PREFILL, RUNNING = "wait_kv", "ready", "prefill", "running"


@dataclass
class Sequence:
    request_id: bytes
    prompt_ids: list[int]
    sampling: Sampling
    state: str
    owner: bytes = b""  # the coordinator's socket identity, for routing output back
    slot: int = -1
    sampler: llama.Sampler | None = None
    n_past: int = 0  # cells of this sequence in the cache
    next_token: int = -1  # token to feed at position n_past in the next step
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    pending_bytes: bytes = b""  # an incomplete UTF-8 sequence carried to the next token
    state_buf: bytearray | None = None
    t_admit_s: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepOutput:
    seq: Sequence
    token_id: int
    piece: str
    finish_reason: str | None  # None while the sequence goes on


class DecodeEngine:
    def __init__(self, cfg: DecodeWorkerConfig, info: ModelInfo, n_threads: int):
        self.cfg, self.info = cfg, info
        self.model = llama.LlamaModel(info.path)
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
        self.batch = llama.Batch(self.ctx.params.n_batch)
        self.slots = SlotTable(cfg.num_slots, cfg.max_queue)
        self.seqs: dict[bytes, Sequence] = {}
        self._ready: deque[bytes] = deque()  # KV landed or local prefill asked, waiting for a slot
        self.geometry = Geometry(info.fingerprint, info.num_layers, info.kv_row_elems, cfg.kv_cache_type, self.ctx.n_stream)
        self.num_finished = 0

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

    def admit(self, request_id: bytes, prompt_ids: list[int], sampling: Sampling, local_prefill: bool, owner=b"") -> Sequence:
        if request_id in self.seqs:
            raise RequestError("request id is already in use on this decode worker")
        if len(prompt_ids) + 1 > self.ctx.n_ctx_seq:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens does not fit a decode slot of {self.ctx.n_ctx_seq} tokens; "
                "shorten it or start the decode worker with a larger --slot-ctx"
            )
        if sampling.max_tokens < 1:
            raise RequestError("max_tokens must be >= 1")
        self.slots.check_capacity(len(self.seqs))
        seq = Sequence(request_id, prompt_ids, sampling, PREFILL if local_prefill else WAIT_KV, owner)
        self.seqs[request_id] = seq
        if local_prefill or len(prompt_ids) == 1:
            seq.state = PREFILL
            self._ready.append(request_id)
        return seq

    def kv_landed(self, seq: Sequence, state_buf: bytearray, t_first_frame_s: float, t_last_frame_s: float) -> None:
        seq.state_buf, seq.state = state_buf, READY
        seq.timings["kv_wait_ms"] = (t_last_frame_s - seq.t_admit_s) * 1e3
        seq.timings["kv_recv_ms"] = (t_last_frame_s - t_first_frame_s) * 1e3
        self._ready.append(seq.request_id)

    def expected_kv_tokens(self, seq: Sequence) -> int:
        return len(seq.prompt_ids) - 1

    # --- the loop's stages ---------------------------------------------------------------

    def place_ready(self) -> list[tuple[Sequence, Exception]]:
        """Give free slots to sequences whose KV landed (inject it) or that prefill locally."""
        failed = []
        while self._ready and self.slots.num_free:
            seq = self.seqs.get(self._ready.popleft())
            if seq is None:  # cancelled while waiting
                continue
            seq.slot = self.slots.acquire()
            seq.sampler = llama.Sampler(seq.sampling.temperature, seq.sampling.top_k, seq.sampling.top_p, seq.sampling.seed)
            seq.timings["queue_ms"] = (time.perf_counter() - seq.t_admit_s) * 1e3 - seq.timings.get("kv_wait_ms", 0.0)
            if seq.state == READY:
                try:
                    self._inject(seq)
                except Exception as e:
                    failed.append((seq, e))
                    self.release(seq)
            # PREFILL sequences feed their prompt in the next steps
        return failed

    def _inject(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        n_cells = self.expected_kv_tokens(seq)
        if self.ctx.set_seq_state(seq.slot, seq.state_buf) == 0:
            raise RequestError("llama.cpp rejected the KV state (type, layer count or layout mismatch)")
        if self.ctx.seq_pos_max(seq.slot) != n_cells - 1:
            raise RequestError(f"injected KV holds positions up to {self.ctx.seq_pos_max(seq.slot)}, expected {n_cells - 1}")
        seq.state_buf = None
        seq.n_past, seq.next_token, seq.state = n_cells, seq.prompt_ids[-1], RUNNING
        seq.timings["inject_ms"] = (time.perf_counter() - t0) * 1e3
        seq.timings["t_inject_done_s"] = time.perf_counter()

    def has_work(self) -> bool:
        return any(s.state in (RUNNING, PREFILL) and s.slot >= 0 for s in self.seqs.values())

    def step(self) -> list[StepOutput]:
        """One llama_decode over all running sequences (+ a local prefill chunk). Returns tokens."""
        running = [s for s in self.seqs.values() if s.state == RUNNING]
        prefilling = [s for s in self.seqs.values() if s.state == PREFILL and s.slot >= 0]
        if not running and not prefilling:
            return []
        tokens, positions, seq_ids, want = [], [], [], []
        for s in running:
            tokens.append(s.next_token)
            positions.append(s.n_past)
            seq_ids.append(s.slot)
            want.append(1)
        budget = self.batch.capacity - len(tokens)
        chunked = []  # (seq, n_fed, finishes_prompt)
        for s in prefilling:
            if budget <= 0:
                break
            todo = s.prompt_ids[s.n_past :]
            n = min(len(todo), budget)
            last = n == len(todo)
            tokens += todo[:n]
            positions += range(s.n_past, s.n_past + n)
            seq_ids += [s.slot] * n
            want += [0] * (n - 1) + [1 if last else 0]
            chunked.append((s, n, last))
            budget -= n
        self.batch.fill(tokens, positions, seq_ids, want)
        t0 = time.perf_counter()
        self.ctx.decode(self.batch)
        step_ms = (time.perf_counter() - t0) * 1e3

        outputs = []
        row = 0
        for s in running:
            s.n_past += 1
            outputs.append(self._sample(s, row, step_ms))
            row += 1
        for s, n, last in chunked:
            s.n_past += n
            row += n
            if last:
                s.state = RUNNING
                s.timings.setdefault("local_prefill_ms", 0.0)
                outputs.append(self._sample(s, row - 1, step_ms))
            else:
                s.timings["local_prefill_ms"] = s.timings.get("local_prefill_ms", 0.0) + step_ms
        return outputs

    def _sample(self, s: Sequence, row: int, step_ms: float) -> StepOutput:
        tok = s.sampler.sample(self.ctx, row)
        now = time.perf_counter()
        if not s.output_ids:
            s.timings["first_step_ms"] = step_ms
            s.timings["t_first_token_s"] = now
        s.output_ids.append(tok)
        finish = None
        piece = ""
        if self.model.is_eog(tok) and not s.sampling.ignore_eos:
            finish = "stop"
        else:
            piece = self._detokenize(s, tok)
            stop_hit = self._stop_hit(s, piece)
            if stop_hit is not None:
                piece, finish = stop_hit, "stop"
            elif len(s.output_ids) >= s.sampling.max_tokens or s.n_past + 1 >= self.ctx.n_ctx_seq:
                finish = "length"
        s.next_token = tok
        if finish is None:
            s.text += piece
        return StepOutput(s, tok, piece, finish)

    def _detokenize(self, s: Sequence, tok: int) -> str:
        data = s.pending_bytes + self.model.token_bytes(tok)
        try:
            text, s.pending_bytes = data.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            if e.start > 0 or len(data) < 4:  # an incomplete multi-byte tail: hold it back
                text, s.pending_bytes = data[: e.start].decode("utf-8"), data[e.start :]
            else:
                text, s.pending_bytes = data.decode("utf-8", errors="replace"), b""
        return text

    def _stop_hit(self, s: Sequence, piece: str) -> str | None:
        """If a stop string completes with this piece, the part of the piece before it."""
        if not s.sampling.stop:
            return None
        tail = s.text + piece
        for stop in s.sampling.stop:
            at = tail.find(stop, max(0, len(s.text) - len(stop) + 1))
            if at >= 0:
                return tail[len(s.text) : at] if at >= len(s.text) else ""
        return None

    def release(self, seq: Sequence) -> None:
        """Free everything the sequence holds, at once."""
        self.seqs.pop(seq.request_id, None)
        if seq.slot >= 0:
            self.ctx.seq_rm(seq.slot)
            self.slots.release(seq.slot)
            seq.slot = -1
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        seq.state_buf = None
        self.num_finished += 1

    def close(self) -> None:
        for seq in list(self.seqs.values()):
            self.release(seq)
        self.batch.close()
        self.ctx.close()
        self.model.close()
