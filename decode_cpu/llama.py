"""Thin owning wrappers over llama.cpp's C API (through llama-cpp-python's ctypes layer).

Each class owns one native object and frees it deterministically in `close()` (and on garbage
collection as a fallback). Nothing here knows about requests, slots or the wire.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

import llama_cpp
from llama_cpp import _logger as _llama_logger

from homelab_disagg.errors import ModelError
from wire.ggml import GGML_TYPES

NUMA_OFF = llama_cpp.GGML_NUMA_STRATEGY_DISABLED
NUMA_NUMACTL = llama_cpp.GGML_NUMA_STRATEGY_NUMACTL  # threads follow the CPU set the process is bound to
_backend_lock = threading.Lock()
_backend = {"ready": False, "numa": NUMA_OFF}  # process-wide by nature: llama.cpp's backend is a singleton


def init_backend(numa_strategy: int = NUMA_OFF, verbose: bool = False) -> None:
    """Once per process: llama.cpp's backend and NUMA mode (0 off, 3 = follow numactl's binding).
    Call it with the NUMA strategy before the first model loads; a later call may still switch
    NUMA on once (llama.cpp allows one NUMA init per process)."""
    with _backend_lock:
        if not _backend["ready"]:
            _llama_logger.set_verbose(verbose)
            llama_cpp.llama_backend_init()
            _backend["ready"] = True
        if numa_strategy and not _backend["numa"]:
            llama_cpp.llama_numa_init(numa_strategy)
            _backend["numa"] = numa_strategy


class LlamaModel:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path, verbose: bool = False, use_mmap: bool = True):
        init_backend(verbose=verbose)
        params = llama_cpp.llama_model_default_params()
        # no mmap: the weights are read into memory this process allocates, which a NUMA-bound
        # process gets on its own node (mmap'd pages live wherever the page cache put them)
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        self._ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._ptr:
            raise ModelError(f"llama.cpp could not load {path}; is it a complete GGUF for this llama.cpp version?")
        self.vocab = llama_cpp.llama_model_get_vocab(self._ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self._ptr)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._ptr)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}  # token -> piece bytes; bounded by the vocabulary

    @property
    def ptr(self):
        return self._ptr

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """Raw bytes of a token's piece (may be a partial UTF-8 sequence; special tokens are empty)."""
        piece = self._pieces.get(token)
        if piece is None:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
                piece = buf.raw[:n]
            else:
                piece = self._piece_buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Render chat messages with the GGUF's own template (llama.cpp's built-in matcher)."""
        tmpl = llama_cpp.llama_model_chat_template(self._ptr, None)
        n = len(messages)
        arr = (llama_cpp.llama_chat_message * n)()
        keep = []
        for i, m in enumerate(messages):
            role, content = str(m.get("role", "user")).encode(), str(m.get("content", "")).encode()
            keep += [role, content]
            arr[i].role, arr[i].content = role, content
        size = 4096 + sum(len(k) for k in keep) * 2
        buf = ctypes.create_string_buffer(size)
        got = llama_cpp.llama_chat_apply_template(tmpl, arr, n, True, buf, size)
        if got > size:
            buf = ctypes.create_string_buffer(got)
            got = llama_cpp.llama_chat_apply_template(tmpl, arr, n, True, buf, got)
        if got < 0:
            raise ModelError("the model's chat template is not supported by llama.cpp; send a plain prompt")
        return buf.raw[:got].decode("utf-8", errors="replace")

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            llama_cpp.llama_model_free(self._ptr)
            self._ptr = None

    __del__ = close


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int  # total cells, shared by all sequences (each sequence gets n_ctx / n_seq_max)
    n_seq_max: int
    n_batch: int = 512
    n_threads: int = 2
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    kv_unified: bool = False  # False: one KV stream per sequence, so a sequence's cells are its own


class LlamaContext:
    """One llama.cpp context: the KV cache of all sequence slots and the decode call."""

    def __init__(self, model: LlamaModel, p: ContextParams):
        self.model, self.params = model, p
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = p.n_ctx
        cp.n_batch = p.n_batch
        cp.n_ubatch = p.n_batch
        cp.n_seq_max = p.n_seq_max
        cp.n_threads = cp.n_threads_batch = p.n_threads
        cp.type_k, cp.type_v = GGML_TYPES[p.type_k].type_id, GGML_TYPES[p.type_v].type_id
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if p.flash_attn else 0
        cp.kv_unified = p.kv_unified
        cp.no_perf = True
        self._ptr = llama_cpp.llama_init_from_model(model.ptr, cp)
        if not self._ptr:
            raise ModelError(f"llama.cpp could not create a context with {p}")
        self.mem = llama_cpp.llama_get_memory(self._ptr)
        self.n_seq_max = llama_cpp.llama_n_seq_max(self._ptr)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self._ptr)
        self.n_stream = 1 if p.kv_unified else self.n_seq_max
        self.n_vocab = model.n_vocab

    def decode(self, batch: "Batch") -> None:
        if batch.num_tokens > self.params.n_batch:  # llama.cpp asserts (aborts the process) on this
            raise ValueError(f"batch of {batch.num_tokens} tokens exceeds n_batch {self.params.n_batch}")
        rc = llama_cpp.llama_decode(self._ptr, batch.raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} (1: no KV slot for the batch)")

    def logits(self, i: int) -> np.ndarray:
        """Logits of batch row i: [n_vocab] float32 view (valid until the next decode)."""
        ptr = llama_cpp.llama_get_logits_ith(self._ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def output_logits(self, num_outputs: int) -> np.ndarray:
        """Logits of every row that asked for them, in batch order: [num_outputs, n_vocab] float32
        view (valid until the next decode)."""
        ptr = llama_cpp.llama_get_logits(self._ptr)
        return np.ctypeslib.as_array(ptr, shape=(num_outputs, self.n_vocab))

    def seq_rm(self, seq_id: int) -> None:
        self._check_seq(seq_id)
        llama_cpp.llama_memory_seq_rm(self.mem, seq_id, -1, -1)

    def seq_pos_max(self, seq_id: int) -> int:
        """Highest position held by seq_id, -1 when it holds no cells."""
        self._check_seq(seq_id)
        return llama_cpp.llama_memory_seq_pos_max(self.mem, seq_id)

    def get_seq_state(self, seq_id: int) -> bytes:
        return bytes(self.copy_seq_state(seq_id))

    def copy_seq_state(self, seq_id: int) -> bytearray:
        """The sequence's state (llama_state_seq_get_data) written straight into a bytearray of its own:
        one copy, no per-byte Python objects (megabytes for a long sequence)."""
        self._check_seq(seq_id)
        n = llama_cpp.llama_state_seq_get_size(self._ptr, seq_id)
        out = bytearray(n)
        got = llama_cpp.llama_state_seq_get_data(self._ptr, (ctypes.c_uint8 * n).from_buffer(out), n, seq_id)
        del out[got:]
        return out

    def seq_trim(self, seq_id: int, num_cells: int) -> bool:
        """Keep only the cells at positions 0..num_cells-1 of seq_id. False if llama.cpp refuses."""
        self._check_seq(seq_id)
        return bool(llama_cpp.llama_memory_seq_rm(self.mem, seq_id, num_cells, -1))

    def set_seq_state(self, seq_id: int, state) -> int:
        """Load a sequence state buffer into `seq_id`; 0 means llama.cpp rejected it. A writable
        buffer (bytearray, numpy) is passed without a copy; read-only bytes are copied once."""
        self._check_seq(seq_id)
        n = len(state)
        try:
            buf = (ctypes.c_uint8 * n).from_buffer(state)
        except TypeError:
            buf = (ctypes.c_uint8 * n).from_buffer_copy(state)
        return llama_cpp.llama_state_seq_set_data(self._ptr, buf, n, seq_id)

    def move_seq(self, src: int, dst: int) -> bool:
        """Move a sequence's cells to another (empty) sequence id through one native buffer of its
        used cells. False (and dst left empty, src intact) if llama.cpp refuses."""
        self._check_seq(src)
        self._check_seq(dst)
        n = llama_cpp.llama_state_seq_get_size(self._ptr, src)
        buf = (ctypes.c_uint8 * n)()
        got = llama_cpp.llama_state_seq_get_data(self._ptr, buf, n, src)
        if llama_cpp.llama_state_seq_set_data(self._ptr, buf, got, dst) == 0:
            self.seq_rm(dst)
            return False
        self.seq_rm(src)
        return True

    def _check_seq(self, seq_id: int) -> None:
        # llama.cpp aborts the whole process on an out-of-range seq id: refuse it here instead
        if not 0 <= seq_id < self.n_seq_max:
            raise ValueError(f"sequence id {seq_id} is out of range 0..{self.n_seq_max - 1}")

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            llama_cpp.llama_free(self._ptr)
            self._ptr = None

    __del__ = close


class Batch:
    """A llama_batch whose arrays are numpy arrays owned here, so filling it is vectorized.

    llama_batch is a plain struct read by llama_decode; the per-row seq-id pointers point into one
    contiguous int32 array, so even seq ids are set with one numpy assignment (one seq per row).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)  # [capacity]
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        i32 = ctypes.POINTER(ctypes.c_int32)
        base = self.seq_id.ctypes.data
        self._seq_ptrs = (i32 * capacity)(*[ctypes.cast(base + 4 * i, i32) for i in range(capacity)])
        self.raw = llama_cpp.llama_batch()
        self.raw.n_tokens = 0
        self.raw.token = self.token.ctypes.data_as(i32)
        self.raw.embd = None
        self.raw.pos = self.pos.ctypes.data_as(i32)
        self.raw.n_seq_id = self.n_seq_id.ctypes.data_as(i32)
        self.raw.seq_id = self._seq_ptrs
        self.raw.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    @property
    def num_tokens(self) -> int:
        return self.raw.n_tokens

    def fill(self, tokens, positions, seq_ids, want_logits) -> None:
        """Rows 0..n-1: token, position, sequence, whether to compute its logits (sequences of
        equal length; scalars broadcast)."""
        n = len(tokens)
        if n > self.capacity:
            raise ValueError(f"batch of {n} tokens exceeds capacity {self.capacity}")
        self.raw.n_tokens = n
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.seq_id[:n] = seq_ids
        self.logits[:n] = want_logits

    def close(self) -> None:
        self.raw = None  # numpy owns the memory; nothing native to free

    __del__ = close


class Sampler:
    """A llama.cpp sampler chain for one sequence: top-k -> top-p -> temperature -> dist, or greedy."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0):
        self._ptr = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self._ptr, s)  # noqa: E731
        if temperature <= 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: LlamaContext, batch_index: int) -> int:
        # llama_sampler_sample also accepts the token into the chain's state
        return llama_cpp.llama_sampler_sample(self._ptr, ctx._ptr, batch_index)

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            llama_cpp.llama_sampler_free(self._ptr)
            self._ptr = None

    __del__ = close


QUANT_FTYPES = {"F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def quantize_model(src, dst, quant: str, n_threads: int = 0) -> None:
    """llama.cpp's own quantizer (what its llama-quantize tool runs): the GGUF at src, its weights as
    `quant`, into dst. Tensors whose rows a K-quant cannot split fall back to llama.cpp's choice."""
    if quant not in QUANT_FTYPES:
        raise ModelError(f"quantization {quant!r} is not one of {', '.join(QUANT_FTYPES)}")
    init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")
