"""Per-step attention metadata: planned once per engine step, read by every layer.

Sequences are ordered decodes first (one new token each), then prefill chunks. All tokens of the
step are flat in one (T,) batch; `query_start_loc` slices it per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    page_tables: list[list[int]],
    num_decodes: int,
    page_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Pack host-side per-sequence lists into device tensors (one small copy per field)."""
    num_seqs = len(query_lens)
    max_pages = max((len(t) for t in page_tables), default=1) or 1
    table = torch.zeros((num_seqs, max_pages), dtype=torch.int32)
    slots: list[torch.Tensor] = []
    for i, (qlen, slen, pages) in enumerate(zip(query_lens, seq_lens, page_tables)):
        table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        pos = torch.arange(slen - qlen, slen, dtype=torch.int64)
        slots.append(table[i, pos // page_size].to(torch.int64) * page_size + pos % page_size)
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
        slot_mapping=torch.cat(slots).to(device) if slots else torch.empty(0, dtype=torch.int64, device=device),
        page_size=page_size,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
    )
