"""Per-step attention metadata: planned once per engine step, read by every layer.

Sequences are ordered decodes first (one new token each), then prefill chunks. All tokens of the
step are flat in one (T,) batch; `query_start_loc` slices it per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lserve.kv_cache.layout import RingGeometry


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
    """(num_seqs, max_pages) int32: for the ring pool, the ring page holding each logical page."""
    ring_slot_mapping: torch.Tensor | None = None
    """(num_tokens,) int64: ring-pool slot of every new token."""

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


def _slots(table: torch.Tensor, query_lens: list[int], seq_lens: list[int], page_size: int) -> torch.Tensor:
    """Cache slot of every new token: (T,) int64, in a fixed number of tensor ops whatever the
    batch (the host work of a decode step must not grow with the number of sequences)."""
    lens = torch.tensor(query_lens, dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(query_lens)), lens)
    # position of each token: its sequence's first new position plus its offset within the chunk
    first = torch.tensor(seq_lens, dtype=torch.int64) - lens
    offset = torch.arange(rows.shape[0]) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    pos = first[rows] + offset
    return table[rows, pos // page_size].to(torch.int64) * page_size + pos % page_size


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    page_tables: list[list[int]],
    num_decodes: int,
    page_size: int,
    device: torch.device,
    seats: list[int] | None = None,
    ring: RingGeometry | None = None,
    request_ids: list[str] | None = None,
) -> AttentionMetadata:
    """Pack host-side per-sequence lists into device tensors (one small copy per field).

    With `ring` (and `seats`), also map every logical page to its ring page: seat s owns ring
    pages s * pages_per_seq .. (s + 1) * pages_per_seq - 1.
    """
    num_seqs = len(query_lens)
    max_pages = max((len(t) for t in page_tables), default=1) or 1
    table = torch.zeros((num_seqs, max_pages), dtype=torch.int32)
    for i, pages in enumerate(page_tables):
        table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    ring_table = ring_slots = None
    if ring is not None:
        assert seats is not None, "a ring pool needs seats"
        offsets = ring.logical_to_ring(max_pages)
        base = torch.tensor(seats, dtype=torch.int32)[:, None] * ring.pages_per_seq
        ring_table = base + offsets[None, :]
        ring_slots = _slots(ring_table, query_lens, seq_lens, page_size).to(device)
        ring_table = ring_table.to(device)
    starts = [0]
    for qlen in query_lens:
        starts.append(starts[-1] + qlen)
    return AttentionMetadata(
        num_seqs=num_seqs,
        num_decodes=num_decodes,
        num_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        page_table=table.to(device),
        slot_mapping=_slots(table, query_lens, seq_lens, page_size).to(device),
        page_size=page_size,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        seats=tuple(seats) if seats is not None else (),
        request_ids=tuple(request_ids) if request_ids is not None else (),
        ring_page_table=ring_table,
        ring_slot_mapping=ring_slots,
    )
