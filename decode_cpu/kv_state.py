"""llama.cpp's per-sequence KV state buffer (llama_state_seq_get_data / set_data), byte for byte.

Layout written by llama-kv-cache.cpp (state_write) in the pinned llama.cpp (llama-cpp-python
0.3.36), little-endian, for a non-M-RoPE model with flash attention (v_trans = 0):

    u32 magic(=0xaf143cd8), i32 seq_id         (llama-context.cpp io_magic; the seq_id is ignored on load)
    u32 n_stream                               (n_seq_max when kv_unified=false, else 1)
    per stream:
      u32 cell_count                           (0 for the streams not holding this sequence)
      if cell_count:
        cell_count x { i32 pos, u32 n_seq_id(=1), i32 seq_id }
        u32 v_trans(=0), u32 n_layer
        n_layer x { i32 k_type, u64 k_row_bytes, cell_count x k_row_bytes }
        n_layer x { i32 v_type, u64 v_row_bytes, cell_count x v_row_bytes }

A model with sliding-window layers (gemma3: llama_kv_cache_iswa) writes two such cache sections after the
one magic and seq_id, each from `u32 n_stream` on: the global layers' cache, then the sliding layers'
(`parse_caches` reads both; the decode worker lays out single-cache states only).

The loader puts the cells into the stream of the destination sequence, whichever stream index
they were written under, so we always write them under stream 0. This module is pure bytes: it
imports no engine, and `StateLayout` lets a receiver place each layer's rows straight into the
final buffer as the layer arrives (one copy, from the socket buffer into the state buffer).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from wire.ggml import GGML_TYPES

STATE_MAGIC = 0xAF143CD8


class StateLayoutError(ValueError):
    pass


def row_bytes(cache_type: str, row_elems: int) -> int:
    """Bytes of one token's K (or V) row of one layer in a llama.cpp cache of that type."""
    t = GGML_TYPES[cache_type]
    if row_elems % t.block_elems:
        raise StateLayoutError(f"{cache_type} needs rows that are multiples of {t.block_elems} elements, got {row_elems}")
    return t.row_bytes(row_elems)


@dataclass(frozen=True)
class StateLayout:
    """Where everything lives in the state buffer of one sequence of `num_cells` cells."""

    n_stream: int
    num_cells: int
    num_layers: int
    k_row_bytes: int
    v_row_bytes: int
    k_type: int
    v_type: int

    @classmethod
    def for_cache(cls, n_stream, num_cells, num_layers, row_elems, cache_type="f16"):
        rb = row_bytes(cache_type, row_elems)
        t = GGML_TYPES[cache_type].type_id
        return cls(n_stream, num_cells, num_layers, rb, rb, t, t)

    @property
    def _cells_offset(self) -> int:
        return 4 + 4 + 4 + 4  # magic, seq_id, n_stream, cell_count of stream 0

    @property
    def _data_offset(self) -> int:
        return self._cells_offset + 12 * self.num_cells + 8  # cells, v_trans, n_layer

    def k_offset(self, layer: int) -> int:
        """Offset of layer's K rows (after its 12-byte type/row-size header)."""
        return self._data_offset + layer * (12 + self.num_cells * self.k_row_bytes) + 12

    def v_offset(self, layer: int) -> int:
        k_end = self._data_offset + self.num_layers * (12 + self.num_cells * self.k_row_bytes)
        return k_end + layer * (12 + self.num_cells * self.v_row_bytes) + 12

    @property
    def nbytes(self) -> int:
        return self.v_offset(self.num_layers) - 12 + 4 * (self.n_stream - 1)

    def allocate(self, first_pos: int = 0) -> bytearray:
        """A buffer with every header written and the K/V rows left to fill."""
        buf = bytearray(self.nbytes)
        struct.pack_into("<IiII", buf, 0, STATE_MAGIC, 0, self.n_stream, self.num_cells)
        cells = np.zeros((self.num_cells, 3), dtype="<i4")
        cells[:, 0] = np.arange(first_pos, first_pos + self.num_cells)  # pos
        cells[:, 1] = 1  # n_seq_id; the seq_id column is discarded by the loader
        buf[self._cells_offset : self._cells_offset + cells.nbytes] = cells.tobytes()
        struct.pack_into("<II", buf, self._data_offset - 8, 0, self.num_layers)
        for layer in range(self.num_layers):
            struct.pack_into("<iQ", buf, self.k_offset(layer) - 12, self.k_type, self.k_row_bytes)
            struct.pack_into("<iQ", buf, self.v_offset(layer) - 12, self.v_type, self.v_row_bytes)
        # the other streams: empty (cell_count 0), already zero
        return buf

    def layer_rows(self, buf: bytearray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Where one layer's K and V rows go in buf: writable uint8 views, num_cells rows each."""
        nk, nv = self.num_cells * self.k_row_bytes, self.num_cells * self.v_row_bytes
        whole = np.frombuffer(buf, dtype=np.uint8)
        ko, vo = self.k_offset(layer), self.v_offset(layer)
        return whole[ko : ko + nk], whole[vo : vo + nv]

    def put_layer(self, buf: bytearray, layer: int, k_rows, v_rows) -> None:
        """Copy one layer's rows (bytes-like, num_cells rows each) into place; rows a codec already
        decoded into place (into layer_rows' views) stay as they are."""
        k_dst, v_dst = self.layer_rows(buf, layer)
        k_src, v_src = (np.frombuffer(memoryview(r).cast("B"), dtype=np.uint8) for r in (k_rows, v_rows))
        if k_src.nbytes != k_dst.nbytes or v_src.nbytes != v_dst.nbytes:
            raise StateLayoutError(f"layer {layer}: got {k_src.nbytes}+{v_src.nbytes} bytes of rows, expected "
                                   f"{k_dst.nbytes}+{v_dst.nbytes}")
        for src, dst in ((k_src, k_dst), (v_src, v_dst)):
            if src.ctypes.data != dst.ctypes.data:
                dst[:] = src


@dataclass
class ParsedState:
    n_stream: int
    positions: np.ndarray  # [num_cells] int32
    layout: StateLayout
    k_rows: list  # per layer: memoryview of num_cells * k_row_bytes
    v_rows: list


def parse_state(buf) -> ParsedState:
    """Read a single-sequence state buffer produced by llama.cpp (flash attention, v_trans=0)."""
    caches = parse_caches(buf)
    if len(caches) != 1:
        raise StateLayoutError(f"state holds {len(caches)} caches: a two-cache (iswa) model's state, read it with "
                               "parse_caches")
    return caches[0]


def parse_caches(buf) -> list[ParsedState]:
    """Read a single-sequence state of every cache llama.cpp keeps, in its order: one for most families;
    for sliding-window (iswa) families the global layers' cache, then the sliding-window layers' cache,
    each written as a whole cache section (n_stream, streams) after one magic and seq_id."""
    mv = memoryview(buf)
    off = 0

    def take(fmt):
        nonlocal off
        if off + struct.calcsize(fmt) > len(mv):
            raise StateLayoutError(f"state buffer truncated at byte {off}")
        vals = struct.unpack_from(fmt, mv, off)
        off += struct.calcsize(fmt)
        return vals

    magic, _seq_id = take("<Ii")
    if magic != STATE_MAGIC:
        raise StateLayoutError(f"state magic {magic:#x}, expected {STATE_MAGIC:#x}: another llama.cpp version?")
    caches = []
    while off < len(mv):
        (n_stream,) = take("<I")
        found = None
        for _ in range(n_stream):
            (cell_count,) = take("<I")
            if cell_count == 0:
                continue
            if found is not None:
                raise StateLayoutError("state holds cells in more than one stream: not a single-sequence state")
            if off + 12 * cell_count > len(mv):
                raise StateLayoutError(f"state buffer truncated at byte {off}")
            cells = np.frombuffer(mv[off : off + 12 * cell_count], dtype="<i4").reshape(cell_count, 3)
            if (cells[:, 1] != 1).any():
                raise StateLayoutError("cells shared by several sequences are not supported")
            off += 12 * cell_count
            v_trans, n_layer = take("<II")
            if v_trans:
                raise StateLayoutError("transposed V (flash attention off) is not supported: enable flash attention")
            k_rows, v_rows, meta = [], [], {}
            for rows, role in ((k_rows, "k"), (v_rows, "v")):
                for _layer in range(n_layer):
                    meta[role] = take("<iQ")  # (type, row bytes)
                    if off + cell_count * meta[role][1] > len(mv):
                        raise StateLayoutError(f"state buffer truncated at byte {off}")
                    rows.append(mv[off : off + cell_count * meta[role][1]])
                    off += cell_count * meta[role][1]
            k_meta, v_meta = meta.get("k", (0, 0)), meta.get("v", (0, 0))
            layout = StateLayout(n_stream, cell_count, n_layer, k_meta[1], v_meta[1], k_meta[0], v_meta[0])
            found = ParsedState(n_stream, cells[:, 0].copy(), layout, k_rows, v_rows)
        if found is None:
            raise StateLayoutError("state holds no cells")
        caches.append(found)
    if not caches:
        raise StateLayoutError("state holds no cache")
    return caches
