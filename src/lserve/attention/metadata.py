"""Per-step attention metadata: planned once per engine step, read by every layer.

Sequences are ordered decodes first (one new token each), then prefill chunks. All tokens of the
step are flat in one (T,) batch; `query_start_loc` slices it per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AttentionMetadata:
    num_seqs: int
    num_decodes: int
    """The first `num_decodes` sequences have exactly one query token."""
    num_tokens: int
    query_start_loc: torch.Tensor
    """(num_seqs + 1,) int32: offsets of each sequence's new tokens in the flat batch."""
    seq_lens: torch.Tensor
    """(num_seqs,) int32: tokens in each sequence after this step (cached + new)."""
    page_table: torch.Tensor
    """(num_seqs, max_pages) int32: page ids per sequence, padded with 0 past its pages."""
    slot_mapping: torch.Tensor
    """(num_tokens,) int64: cache slot (page_id * page_size + offset) of every new token."""
    page_size: int
    query_lens_cpu: tuple[int, ...]
    """Host copy of the new-token counts per sequence."""
    seq_lens_cpu: tuple[int, ...]
    """Host copy of `seq_lens`."""
    decode_page_list: torch.Tensor | None = None
    """(num_decodes, Hkv, max_list) int32: logical pages (indices into each page table) that the
    dense heads of each decoding sequence read; None reads every page (dynamic sparsity off)."""
    decode_page_list_len: torch.Tensor | None = None
    """(num_decodes, Hkv) int32: entries used in each row of `decode_page_list`."""
    seats: tuple[int, ...] = ()
    """Each sequence's seat (its rows in per-request buffers), when the engine assigns seats."""
    request_ids: tuple[str, ...] = ()
    """Each sequence's request id, when known (per-request state such as page selections)."""
    ring_page_table: torch.Tensor | None = None
    """(num_seqs, max_pages) int32: for the ring pool, the ring page holding each logical page
    (its null page for the pages the sequence no longer holds)."""
    ring_slot_mapping: torch.Tensor | None = None
    """(num_tokens,) int64: ring-pool slot of every new token."""
    window_page_table: torch.Tensor | None = None
    """As `ring_page_table`, for the sliding-window layers' pool."""
    window_slot_mapping: torch.Tensor | None = None

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


def _slots(table: np.ndarray, query_lens: np.ndarray, seq_lens: np.ndarray, page_size: int) -> np.ndarray:
    """Cache slot of every new token: (T,) int64, in a fixed number of array ops whatever the
    batch (the host work of a decode step must not grow with the number of sequences)."""
    rows = np.repeat(np.arange(len(query_lens)), query_lens)
    # position of each token: its sequence's first new position plus its offset within the chunk
    first = seq_lens - query_lens
    offset = np.arange(rows.shape[0]) - np.repeat(np.cumsum(query_lens) - query_lens, query_lens)
    pos = first[rows] + offset
    return table[rows, pos // page_size].astype(np.int64) * page_size + pos % page_size


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays (int32 / int64) as device tensors through one copy: a step's metadata costs
    one transfer instead of one per field (each a few microseconds of host time on a GPU).

    On a GPU the copy starts from pinned memory without waiting: the host goes on while earlier
    steps still run (a copy from pageable memory would wait for the device to catch up). The
    pinned block is not reused before the copy is done (PyTorch's host allocator tracks it)."""
    offsets, total = [], 0
    for a in arrays:
        total = -(-total // 8) * 8  # every field starts 8-byte aligned, so it can be viewed as its dtype
        offsets.append(total)
        total += a.nbytes
    host = torch.empty(max(total, 8), dtype=torch.uint8, pin_memory=device.type == "cuda")
    buf = host.numpy()
    for a, off in zip(arrays, offsets):
        buf[off : off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    flat = host.to(device, non_blocking=True)  # on a CPU no copy: the tensors view `host`
    return [
        flat[off : off + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape) for a, off in zip(arrays, offsets)
    ]


_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    page_tables: list[list[int]] | np.ndarray,
    num_decodes: int,
    page_size: int,
    device: torch.device,
    seats: list[int] | None = None,
    ring_table: np.ndarray | None = None,
    request_ids: list[str] | None = None,
    window_table: np.ndarray | None = None,
) -> AttentionMetadata:
    """Pack host-side per-sequence values into device tensors (one copy for all of them).

    `page_tables`: each sequence's page ids, as lists or as one (num_seqs, width) int32 array
    (rows of `SeatPageRows`, 0-padded). `ring_table` / `window_table`: the same for the ring and
    window pools, (num_seqs, width) int32 (`RingPages.rows`), at least as wide as the sequences'
    pages; their slots are mapped here too.
    """
    num_seqs = len(query_lens)
    if isinstance(page_tables, np.ndarray):
        table = page_tables.astype(np.int32, copy=False)
        if table.shape[1] == 0:
            table = np.zeros((num_seqs, 1), dtype=np.int32)
    else:
        max_pages = max((len(t) for t in page_tables), default=1) or 1
        table = np.zeros((num_seqs, max_pages), dtype=np.int32)
        for i, pages in enumerate(page_tables):
            table[i, : len(pages)] = pages
    max_pages = table.shape[1]
    qlens = np.asarray(query_lens, dtype=np.int64)
    lens = np.asarray(seq_lens, dtype=np.int64)
    starts = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(qlens, out=starts[1:])
    arrays = [starts, lens.astype(np.int32), table, _slots(table, qlens, lens, page_size)]
    for pool_table in (t for t in (ring_table, window_table) if t is not None):
        pool_table = pool_table.astype(np.int32, copy=False)
        assert pool_table.shape[0] == num_seqs and pool_table.shape[1] >= max_pages, "a pool table is too narrow"
        arrays += [pool_table, _slots(pool_table, qlens, lens, page_size)]
    on_device = to_device(arrays, device)
    tables = iter(on_device[4:])  # (page table, slots) of the ring, then of the window pool
    ring_pair = (next(tables), next(tables)) if ring_table is not None else (None, None)
    window_pair = (next(tables), next(tables)) if window_table is not None else (None, None)
    return AttentionMetadata(
        num_seqs=num_seqs,
        num_decodes=num_decodes,
        num_tokens=int(starts[-1]),
        query_start_loc=on_device[0],
        seq_lens=on_device[1],
        page_table=on_device[2],
        slot_mapping=on_device[3],
        page_size=page_size,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        seats=tuple(seats) if seats is not None else (),
        request_ids=tuple(request_ids) if request_ids is not None else (),
        ring_page_table=ring_pair[0],
        ring_slot_mapping=ring_pair[1],
        window_page_table=window_pair[0],
        window_slot_mapping=window_pair[1],
    )
