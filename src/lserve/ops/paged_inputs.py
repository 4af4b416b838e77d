"""Input checks, optional-argument packing and the stored page selection shared by the paged
attention launchers (no Triton here: the page selector imports this on any machine)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lserve.kv_cache.fp8 import FP8_DTYPE


class PlanRow(enum.IntEnum):
    """The rows of the page selector's per-step plan, a (len(PlanRow), seats + 1) int64 device
    tensor with one column per decoding row. The selector writes it once per step; the selection
    kernels (`ops.page_scores`, `ops.sparse_decode`), their references and the selector's own
    PyTorch path read it by these names (Triton kernels through the `PLAN_*` constexprs of their
    modules, which take these values)."""

    RECOMPUTE = 0
    """1: the row re-selects its stored pages this step; 0: it reuses them."""
    FITS = 1
    """1: the row's pages fit the budget and it reads every page."""
    NUM_PAGES = 2
    """Pages of the row's sequence, the one being written included."""
    ANCHOR = 3
    """The first page read as a tail (after the stored pages): pages anchor..num_pages-1."""
    SEAT = 4
    """The row's seat: the store's row of its selected pages."""


PLAN_ROWS = len(PlanRow)


class PlanView(NamedTuple):
    """The first `nd` columns of a plan, by name."""

    recompute: torch.Tensor
    fits: torch.Tensor
    num_pages: torch.Tensor
    anchor: torch.Tensor
    seat: torch.Tensor

    @classmethod
    def of(cls, plan: torch.Tensor, nd: int) -> PlanView:
        return cls(*(plan[row, :nd] for row in PlanRow))


@dataclass(frozen=True)
class TopP:
    """A top-p page budget (`ops.page_scores.store_top_pages`): keep pages until their estimated
    share of the softmax mass, exp(temperature * score) normalised over the sequence's pages,
    reaches `p`; at least `min_keep` and at most the budget's stored pages."""

    p: float
    temperature: float
    """What turns a page score into a logit: the softmax scale, over the group size for scores
    summed over a GQA group."""
    min_keep: int
    counts: torch.Tensor
    """(seats + 1, H) int32: how many stored pages each (seat, head) keeps, written by the selection."""


@dataclass(frozen=True)
class StoredSelection:
    """A layer's selection as the selector keeps it, for kernels that read it directly.

    Decoding row b, KV head h reads: every page 0..num_pages-1 when the row fits the budget
    (`PlanRow.FITS`); else `store[seat, h, :keep]` followed by pages anchor..num_pages-1."""

    store: torch.Tensor
    """(seats + 1, H, >= keep) int32: selected older pages, ascending."""
    plan: torch.Tensor
    """(PLAN_ROWS, seats + 1) int64: one column per decoding row, rows named by `PlanRow`."""
    keep: int
    width: int
    """The most pages one row reads (keep + the longest tail): what splits are sized for."""
    counts: torch.Tensor | None = None
    """With a top-p budget: (seats + 1, H) int32, how many of `store[seat, h, :keep]` are read
    (the tail pages then start at that entry); None: all `keep`."""


def check_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    page_list: torch.Tensor | None,
    page_list_len: torch.Tensor | None,
) -> tuple[int, int]:
    """Validate shapes and strides of a paged attention call; returns (page_size, num_kv_heads)."""
    hq, d = q.shape[-2:]
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if page_size & (page_size - 1) or not 16 <= page_size <= 128:
        raise ValueError(f"page size must be a power of two from 16 to 128, got {page_size}")
    if q.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("q needs a contiguous last dim and the caches must be contiguous")
    if page_table.stride(-1) != 1:
        raise ValueError("the page table needs a contiguous last dim")
    if (page_list is None) != (page_list_len is None):
        raise ValueError("page_list and page_list_len go together")
    if page_list is not None and page_list.stride(-1) != 1:
        raise ValueError("page_list needs a contiguous last dim")
    return page_size, hkv


def check_kv_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, placeholder: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """An FP8 cache's (num_pages, Hkv, page_size) scales for a kernel: (k_scale, v_scale, stride per
    page, stride per head);
    `placeholder` twice and zero strides for a cache in the model's dtype (never read)."""
    if (k_cache.dtype == FP8_DTYPE) != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError(f"an FP8 cache needs k_scale and v_scale, another none (cache {k_cache.dtype})")
    if k_scale is None or v_scale is None:
        return placeholder, placeholder, 0, 0
    num_pages, page_size, hkv = k_cache.shape[:3]
    if (k_scale.shape != (num_pages, hkv, page_size) or v_scale.shape != k_scale.shape or k_scale.dtype != torch.float32
            or v_scale.dtype != torch.float32 or not k_scale.is_contiguous() or not v_scale.is_contiguous()):
        raise ValueError(f"scales {tuple(k_scale.shape)} {k_scale.dtype} do not fit cache {tuple(k_cache.shape)}")
    return k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)


def check_label_scale(k_label: torch.Tensor, label_scale: torch.Tensor | None) -> None:
    """FP8 labels (Hkv, slots, r) need their (Hkv, slots) float32 scales, labels in another dtype none."""
    if (k_label.dtype == FP8_DTYPE) != (label_scale is not None):
        raise ValueError(f"FP8 labels need label_scale, others none (labels {k_label.dtype})")
    if label_scale is not None and (label_scale.shape != k_label.shape[:2] or label_scale.dtype != torch.float32
                                    or not label_scale.is_contiguous()):
        raise ValueError(f"label scales {tuple(label_scale.shape)} {label_scale.dtype} do not fit labels "
                         f"{tuple(k_label.shape)}")


_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """One int32 zero per device, made once (never written: kernels only take its pointer)."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        t = _PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def pack_sparse_args(
    device: torch.device,
    streaming_heads: torch.Tensor | None,
    page_list: torch.Tensor | None,
    page_list_len: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(streaming flags int8, page list, list lengths) with small placeholders for absent ones
    (kernels skip them through constexpr flags, but every pointer argument needs a tensor)."""
    dummy = _placeholder(device)
    stream = streaming_heads.to(torch.int8) if streaming_heads is not None else dummy
    lst = page_list if page_list is not None else dummy.view(1, 1, 1)
    lst_len = page_list_len.contiguous() if page_list_len is not None else dummy.view(1, 1)
    return stream, lst, lst_len
