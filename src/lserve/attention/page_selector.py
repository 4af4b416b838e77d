"""Query-aware KV page selection for decode (dynamic sparsity), reused for several steps.

Per layer and decoding sequence, each dense KV head reads only: the pages with the highest
scores (`score`: `lserve.sparse.selection`) among the older pages (`token_budget // page_size - 1`
of them, or with a top-p budget as many as carry p of the estimated attention) plus the newest page.
Selection is per KV head, shared by its GQA query heads (scores summed over the group: on the
default model this keeps more true attention than max and as much as a selection per query head;
docs/sparsity.md has the measurement). A sequence whose context fits the budget reads every page: no selection at all.

Reuse (LServe's reusable selection): a request recomputes its selection on its first decode
step and then every `interval` steps, counting its own steps even inside a mixed batch. In
between, the stored pages are read again, plus every page from the newest page at selection time
("the anchor") to the current newest page, so tokens generated since are always attended.

The kernels read a page list per (sequence, KV head): logical page indices, ascending, and a
count. The backend appends K/V and key statistics first, then asks the selector for the lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lserve.attention.metadata import AttentionMetadata
from lserve.ops.paged_inputs import PLAN_ROWS, PlanRow, PlanView, StoredSelection, TopP
from lserve.ops.reference import store_top_pages_ref


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _RequestState:
    seat: int
    anchor: int
    """The newest logical page when the selection was made (it and later pages are always read)."""
    age: int
    """Decode steps since the selection was made."""


@dataclass(frozen=True)
class DecodePlan:
    """Per step: what each decoding row does (host lists; the device copy is in the selector's buffers)."""

    recompute: tuple[bool, ...]
    fits: tuple[bool, ...]
    num_pages: tuple[int, ...]
    anchor: tuple[int, ...]

    @property
    def mode(self) -> str:
        """"none" (every row reads every page), "reuse" (no row re-selects) or "select"."""
        if all(self.fits):
            return "none"
        return "select" if any(self.recompute) else "reuse"


class PageSelector:
    """Chooses and remembers, per layer, the KV pages that each decoding sequence's dense heads read."""

    def __init__(
        self,
        heads_per_layer: list[int],
        page_size: int,
        token_budget: int,
        interval: int,
        num_seats: int,
        device: torch.device,
        num_dense_layers: int = 0,
        aggregate: str = "sum",
        score: str = "quest",
        top_p: float | None = None,
        min_tokens: int = 0,
        temperature: float = 1.0,
        local_tokens: int = 0,
    ) -> None:
        self.page_size = page_size
        self.score = score
        """quest, midrange, rope_channels, label_channels or rope_mass (`lserve.sparse.selection`):
        the backend scores pages by it."""
        self.budget_pages = max(1, token_budget // page_size)
        self.keep = self.budget_pages - 1
        """Older pages kept per head besides the newest page."""
        self.local_pages = cdiv(local_tokens, page_size)
        """Older pages always kept when `local_tokens` > 0: the ones right before the anchor (with
        page 0, the sink: one more), whatever their scores."""
        if self.local_pages and self.local_pages + 1 > self.keep:
            raise ValueError(
                f"token_budget={token_budget} keeps {self.keep} older pages of {page_size} tokens: too few for "
                f"the first page and selection_local_tokens={local_tokens} ({self.local_pages} pages); raise "
                f"token_budget to at least {(self.local_pages + 2) * page_size} or lower selection_local_tokens")
        self.interval = interval
        self.num_dense_layers = num_dense_layers
        self.aggregate = aggregate
        self.tail_width = cdiv(interval, page_size) + 1
        """Most pages that can lie between the anchor and the newest page while a selection lives."""
        self.device = device
        # one spare row (seat `num_seats`) for the padded rows of a captured decode graph
        self.scratch_seat = num_seats
        self._store = [
            torch.zeros((num_seats + 1, h, max(self.keep, 1)), dtype=torch.int32, device=device)
            for h in heads_per_layer
        ]
        # per-row plan on the device, in fixed buffers so that a captured graph reads this step's
        # plan: rows past the step's decodes are inert (fit, one page, the spare seat)
        self._plan_dev = torch.zeros((PLAN_ROWS, num_seats + 1), dtype=torch.int64, device=device)
        self._top_p: list[TopP] | None = None
        if top_p is not None and self.keep:
            # one tensor for every layer (a step's pages read are one reduction over it)
            self._counts = torch.zeros((len(heads_per_layer), num_seats + 1, max(heads_per_layer)),
                                       dtype=torch.int32, device=device)
            min_keep = min(max(cdiv(min_tokens, page_size) - 1, 1), self.keep)
            self._top_p = [TopP(top_p, temperature, min_keep, self._counts[i, :, :h])
                           for i, h in enumerate(heads_per_layer)]
        self._state: dict[str, _RequestState] = {}
        self.plan: DecodePlan | None = None
        self.num_selections: dict[str, int] = {}
        """Per request: how many times its selection was (re)computed (statistics and tests)."""

    def layer_selects(self, layer: int) -> bool:
        return layer >= self.num_dense_layers

    def prepare(self, md: AttentionMetadata) -> DecodePlan | None:
        """Decide, per decoding row, whether its selection is recomputed this step (host work only)."""
        nd = md.num_decodes
        if nd == 0:
            self.plan = None
            return None
        assert len(md.request_ids) >= nd and len(md.seats) >= nd, "page selection needs request ids and seats"
        state: dict[str, _RequestState] = {}
        recompute, fits, num_pages, anchor = [], [], [], []
        for i in range(nd):
            rid, seat = md.request_ids[i], md.seats[i]
            n = cdiv(md.seq_lens_cpu[i], self.page_size)
            fit = n <= self.budget_pages
            old = self._state.get(rid)
            redo = (
                not fit
                and (old is None or old.seat != seat or old.age + 1 >= self.interval or n - old.anchor > self.tail_width)
            )
            if fit:
                st = None
            elif redo:
                st = _RequestState(seat, n - 1, 0)
                self.num_selections[rid] = self.num_selections.get(rid, 0) + 1
            else:
                assert old is not None
                st = _RequestState(seat, old.anchor, old.age + 1)
            if st is not None:
                state[rid] = st  # requests not decoding this step drop their state (their seat may move)
            recompute.append(redo)
            fits.append(fit)
            num_pages.append(n)
            anchor.append(st.anchor if st is not None else n - 1)
        self._state = state
        # a fresh (pinned, on a GPU) host block each step, copied without waiting for the device:
        # the block must not change before the copy ran, and earlier steps may still be running
        host = torch.empty((PLAN_ROWS, self._plan_dev.shape[1]), dtype=torch.int64,
                           pin_memory=self.device.type == "cuda")
        inert = self._inert_row()
        rows = {PlanRow.RECOMPUTE: recompute, PlanRow.FITS: fits, PlanRow.NUM_PAGES: num_pages,
                PlanRow.ANCHOR: anchor, PlanRow.SEAT: list(md.seats[:nd])}
        for row in PlanRow:
            host[row].fill_(inert[row])
            host[row, :nd] = torch.tensor(rows[row], dtype=torch.int64)
        self._plan_dev.copy_(host, non_blocking=True)
        self.plan = DecodePlan(tuple(recompute), tuple(fits), tuple(num_pages), tuple(anchor))
        return self.plan

    @property
    def mode(self) -> str:
        return self.plan.mode if self.plan is not None else "none"

    def inert_plan(self, rows: int, mode: str) -> None:
        """A step of `rows` inert decoding rows that takes `mode`'s path on the host (what a CUDA
        graph captured at start-up records); on the device every row fits and reads one page of
        the spare seat, as a captured graph's padded rows do."""
        assert mode in ("none", "reuse", "select")
        fits = mode == "none"
        self.plan = DecodePlan((mode == "select",) * rows, (fits,) * rows, (1,) * rows, (0,) * rows)
        for row, value in self._inert_row().items():
            self._plan_dev[row].fill_(value)

    def _inert_row(self) -> dict[PlanRow, int]:
        """The plan of a row no request owns (a captured graph's padding): it fits, reads one
        page, and belongs to the spare seat."""
        return {PlanRow.RECOMPUTE: 0, PlanRow.FITS: 1, PlanRow.NUM_PAGES: 1, PlanRow.ANCHOR: 0,
                PlanRow.SEAT: self.scratch_seat}

    def forget(self, request_id: str) -> None:
        self._state.pop(request_id, None)
        self.num_selections.pop(request_id, None)

    def pages_read(self, row: int) -> int:
        """Pages one dense head of decoding row `row` reads this step (in a selecting layer);
        with a top-p budget, only the pages from the anchor on (the stored ones: `stored_pages`)."""
        plan = self.plan
        assert plan is not None
        if plan.fits[row]:
            return plan.num_pages[row]
        stored = 0 if self._top_p is not None else self.keep
        return stored + plan.num_pages[row] - plan.anchor[row]

    def stored_pages(self, nd: int) -> torch.Tensor | None:
        """With a top-p budget: per decoding row, the stored pages its selection reads this step,
        summed over the selecting layers and heads ((nd,) int64 on the device; 0 for rows that
        fit); None without top-p. Queue it after the step's forward."""
        if self._top_p is None or self.plan is None or self.mode == "none":
            return None
        plan = PlanView.of(self._plan_dev, nd)
        per_row = self._counts[self.num_dense_layers:, plan.seat].sum(dim=(0, 2))
        return torch.where(plan.fits.bool(), 0, per_row)

    def begin_forward(self) -> None:
        """Forget the tensors shared by the layers of one forward (called before its first layer)."""
        self._shared: tuple[torch.Tensor, ...] | None = None
        self._forced: torch.Tensor | None = None

    def _shared_tensors(self, nd: int) -> tuple[torch.Tensor, ...]:
        """What every selecting layer of this forward reads the same way: (fit (nd, 1, 1) bool,
        all pages (nd, 1, W) int32, tail pages (nd, 1, T) int32, counts (nd, 1) int32, anchor)."""
        shared = getattr(self, "_shared", None)
        if shared is None or shared[0].shape[0] != nd:
            _, fits, num_pages, anchor, _ = PlanView.of(self._plan_dev, nd)
            last = (num_pages - 1)[:, None]
            tail = (anchor[:, None] + torch.arange(self.tail_width, device=self.device)[None, :]).clamp(max=last)
            width = self.keep + self.tail_width
            every = torch.minimum(torch.arange(width, device=self.device)[None, :], last)
            fit = fits.bool()
            counts = torch.where(fit, num_pages, self.keep + num_pages - anchor)
            shared = (fit[:, None, None], every.to(torch.int32)[:, None, :], tail.to(torch.int32)[:, None, :],
                      counts.to(torch.int32)[:, None], anchor)
            self._shared = shared
        return shared

    def update(self, layer: int, nd: int, scores_fn, store_fn=store_top_pages_ref) -> StoredSelection | None:
        """This layer's stored selection, recomputed first for the rows that re-select this step;
        None when every page is read (no row selects, or a dense layer).

        `scores_fn()` returns the page scores (nd, H, P) of the current queries; it is called only
        in "select" mode. `store_fn(scores, plan, store, keep, top_p=...)` writes the re-selecting
        rows' top pages into the store (`ops.page_scores.store_top_pages` on a GPU, its PyTorch
        reference by default). Only device buffers and the host mode are read, so a CUDA graph captured
        for a mode replays correctly for any later step of the same mode.
        """
        mode = self.mode
        if mode == "none" or not self.layer_selects(layer):
            return None
        store = self._store[layer]
        top_p = self._top_p[layer] if self._top_p is not None else None
        if self.keep and mode == "select":
            store_fn(self._force_local(scores_fn(), nd), self._plan_dev[:, :nd], store, self.keep, top_p=top_p)
        return StoredSelection(store, self._plan_dev, self.keep, self.keep + self.tail_width,
                               top_p.counts if top_p is not None else None)

    def _force_local(self, scores: torch.Tensor, nd: int) -> torch.Tensor:
        """With a local window: page 0 and the `local_pages` pages before each row's anchor get the
        largest finite score, so that the top-k keeps them first (device ops only: safe in a graph)."""
        if not self.local_pages:
            return scores
        forced = getattr(self, "_forced", None)  # the same for every layer of a forward
        if forced is None or forced.shape != (nd, 1, scores.shape[2]):
            anchor = PlanView.of(self._plan_dev, nd).anchor[:, None]
            pages = torch.arange(scores.shape[2], device=scores.device)[None, :]
            forced = ((pages == 0) | ((pages < anchor) & (pages >= anchor - self.local_pages)))[:, None, :]
            self._forced = forced
        return scores.masked_fill(forced, torch.finfo(scores.dtype).max)

    def select(self, layer: int, nd: int, scores_fn) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Page lists (nd, H, W) int32 and counts (nd, H) int32 of this layer, or None to read every page
        (`update`, then the stored pages spelled out as explicit lists). The parts that do not
        depend on the layer are built once per forward (`begin_forward`): fewer small kernels."""
        sel = self.update(layer, nd, scores_fn)
        if sel is None:
            return None
        store = sel.store
        heads = store.shape[1]
        seats = PlanView.of(self._plan_dev, nd).seat
        fit, every, tail, counts, _ = self._shared_tensors(nd)
        if sel.counts is None:
            selected = torch.cat([store[seats][:, :, : self.keep], tail.expand(nd, heads, -1)], dim=2)
            lists = torch.where(fit, every.expand(nd, heads, -1), selected)
            return lists, counts.expand(nd, heads).contiguous()
        # a top-p selection: each head's stored pages, then the tail right after them
        kept = sel.counts[seats].long()[:, :, None]  # (nd, H, 1)
        j = torch.arange(self.keep + self.tail_width, device=self.device)[None, None, :]
        from_store = torch.gather(store[seats].long(), 2, j.clamp(max=self.keep - 1).expand(nd, heads, -1))
        from_tail = torch.gather(tail.long().expand(nd, heads, -1), 2, (j - kept).clamp(0, self.tail_width - 1))
        selected = torch.where(j < kept, from_store, from_tail).to(torch.int32)
        lists = torch.where(fit, every.expand(nd, heads, -1), selected)
        n = torch.where(fit[:, :, 0], counts, counts - self.keep + kept[:, :, 0].to(counts.dtype))
        return lists, n.to(torch.int32).contiguous()
