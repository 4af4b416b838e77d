"""How well a page score finds the attention: recall of page selection, measured offline.

Page selection (dynamic sparsity, `lserve.attention.page_selector`) ranks a sequence's KV pages by
a score (`lserve.sparse.selection`) and reads the newest page plus the best older pages within a
token budget. This module measures, on keys and queries captured from one exact forward pass of a
model, what that choice keeps:

- `capture` runs the model once with exact causal attention and keeps, per layer, the post-RoPE
  queries of the last positions and every key;
- `page_scores` is the engine's score of every page for one captured query (it calls the torch
  backend's `page_scores_torch` / `channel_page_scores_torch` over statistics or labels built
  from the captured keys by the backend's own `update_key_stats` / `write_labels`, with an
  identity page table), or the oracle: the true attention mass of each page;
- `select` is the engine's choice (`PageSelector`, `ops.reference.store_top_pages_ref`);
- `recall` is the share of each query head's true softmax attention on the chosen pages;
- `needle_rank` is the rank of a needle's page among the older pages under a score, and
  `attention_on_pages` the true attention on given pages (the needle's, page 0);
- `calibrate_label_channels` chooses DoubleSparsity-style label channels per (layer, KV head);
- `SelectionReport` collects a run's numbers (`summarize_recall`: overall, layers 0-1, layers
  2+, the worst (layer, KV head)) and writes them as JSON.

The statistics of quest / midrange are built as the engine builds them: a prefill of the keys
before the first captured query (cached per capture), then an append up to the query's position.

A query at prompt position p sees keys 0..p, as a decode step whose sequence ends at p would.
The GQA group's query heads share one selection; scores aggregate over the group ("sum" as the
engine's default). `benchmarks/selection_recall.py` is the command line over this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lserve.attention.torch_backend import (
    channel_page_scores_torch,
    empty_labels,
    page_scores_torch,
    update_key_stats,
    write_labels,
)
from lserve.errors import LServeError
from lserve.sparse.selection import CHANNEL_SCORES, STATISTICS_SCORES

SCORE_KINDS = (*STATISTICS_SCORES, *CHANNEL_SCORES, "oracle")


@dataclass(frozen=True, eq=False)
class LayerCapture:
    """One layer's post-RoPE queries of the last positions and all keys of one prompt (CPU, float32)."""

    queries: torch.Tensor
    """(Q, Hq, D): the queries of positions L - Q .. L - 1."""
    keys: torch.Tensor
    """(L, Hkv, D): every key of the prompt."""
    scale: float
    """The attention's softmax scale (D ** -0.5)."""
    cache: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    """Key statistics of the keys before the first captured query (`key_statistics`)."""

    @property
    def num_queries(self) -> int:
        return int(self.queries.shape[0])

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return int(self.queries.shape[1]) // int(self.keys.shape[1])

    def position(self, query_index: int) -> int:
        """The prompt position of captured query `query_index` (negative indices count from the end)."""
        if not -self.num_queries <= query_index < self.num_queries:
            raise LServeError(f"query index {query_index} outside the {self.num_queries} captured queries")
        return int(self.keys.shape[0]) - self.num_queries + query_index % self.num_queries


def capture(model: Any, token_ids: torch.Tensor, num_queries: int) -> list[LayerCapture]:
    """Run `model` (an lserve decoder: `model(ids, positions, attn)`) once over `token_ids` (L,)
    with exact causal attention and keep, per layer, the queries of the last `num_queries`
    positions and every key, float32 on the CPU."""
    ids = token_ids.reshape(-1).long()
    if not 1 <= num_queries <= ids.shape[0]:
        raise LServeError(f"num_queries={num_queries} must lie in [1, {ids.shape[0]}] (the prompt length)")
    layers: dict[int, LayerCapture] = {}

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, scale=scale,
                                             enable_gqa=True)
        layers[layer_idx] = LayerCapture(q[-num_queries:].float().cpu().clone(), k.float().cpu().clone(), scale)
        return out[0].transpose(0, 1)

    device = next(model.parameters()).device
    with torch.inference_mode():
        model(ids.to(device), torch.arange(ids.shape[0], device=device), attn)
    return [layers[i] for i in sorted(layers)]


def page_attention(capture: LayerCapture, query_index: int, page_size: int = 64) -> torch.Tensor:
    """(Hq, pages): each query head's true softmax attention mass per page, for the captured query
    `query_index` over keys 0..p (its position p)."""
    p = capture.position(query_index)
    keys = capture.keys[: p + 1]  # (n, Hkv, D)
    hkv, d = keys.shape[1], keys.shape[2]
    q = capture.queries[query_index].view(hkv, capture.group, d)
    logits = torch.bmm(q, keys.permute(1, 2, 0)).double() * capture.scale  # (Hkv, G, n)
    probs = torch.softmax(logits, dim=-1).reshape(hkv * capture.group, -1)
    pages = -(-(p + 1) // page_size)
    return F.pad(probs, (0, pages * page_size - (p + 1))).view(probs.shape[0], pages, page_size).sum(-1)


def key_statistics(capture: LayerCapture, n: int, page_size: int, logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_min, k_max), each (rows, Hkv, D) for the pages of the first `n` keys: the engine's
    per-logical-page key statistics (`update_key_stats`), as a prefill of the keys before the
    first captured query (kept in `capture.cache`) followed by an append of the keys up to n."""
    pages = -(-n // page_size)
    rows = pages * page_size // logical
    total_rows = -(-int(capture.keys.shape[0]) // page_size) * page_size // logical
    base_len = capture.position(0) // logical * logical
    key = ("stats", logical, total_rows)
    if key not in capture.cache:
        shape = (total_rows, *capture.keys.shape[1:])
        k_min, k_max = torch.zeros(shape), torch.zeros(shape)
        update_key_stats(k_min, k_max, capture.keys[:base_len], torch.arange(base_len), logical)
        capture.cache[key] = (k_min, k_max)
    k_min, k_max = (t[:rows].clone() for t in capture.cache[key])
    update_key_stats(k_min, k_max, capture.keys[base_len:n], torch.arange(base_len, n), logical)
    return k_min, k_max


def page_scores(
    kind: str,
    capture: LayerCapture,
    query_index: int,
    page_size: int = 64,
    logical: int = 16,
    channels: torch.Tensor | None = None,
    aggregate: str = "sum",
    label_fp8: bool = False,
) -> torch.Tensor:
    """(Hkv, pages): the engine's score of every page for captured query `query_index`.

    kind: quest, midrange (`page_scores_torch` over per-`logical`-token key min/max),
    rope_channels / label_channels / rope_mass (`channel_page_scores_torch` over key labels on
    `channels`, (Hkv, r) int; `label_fp8`: labels stored as FP8 with per-token scales, as the
    engine's `label_dtype="fp8"`), or oracle (true attention mass per page, summed over the GQA group)."""
    if kind not in SCORE_KINDS:
        raise LServeError(f"unknown page score {kind!r}; expected one of {', '.join(SCORE_KINDS)}")
    p = capture.position(query_index)
    n, hkv = p + 1, int(capture.keys.shape[1])
    if kind == "oracle":
        mass = page_attention(capture, query_index, page_size)
        return mass.view(hkv, capture.group, -1).sum(1).float()
    pages = -(-n // page_size)
    q = capture.queries[query_index][None]  # (1, Hq, D)
    table = torch.arange(pages, dtype=torch.int32)[None]
    seq_lens = torch.tensor([n], dtype=torch.int32)
    if kind in CHANNEL_SCORES:
        if channels is None or channels.shape[0] != hkv:
            raise LServeError(f"{kind} needs channels of shape ({hkv}, r)")
        k_label, scale = empty_labels(hkv, pages * page_size, int(channels.shape[1]), label_fp8)
        write_labels(k_label, channels.long(), capture.keys[:n], torch.arange(n), scale)
        return channel_page_scores_torch(q, k_label, channels.long(), table, seq_lens, page_size, aggregate,
                                         mass=kind == "rope_mass", label_scale=scale)[0]
    if page_size % logical:
        raise LServeError(f"page_size={page_size} must be a multiple of logical={logical}")
    k_min, k_max = key_statistics(capture, n, page_size, logical)
    return page_scores_torch(q, k_min, k_max, table, seq_lens, page_size, logical, aggregate,
                             midrange=kind == "midrange")[0]


def older_page_order(scores: torch.Tensor) -> torch.Tensor:
    """(Hkv, pages - 1): the older pages (all but the newest) best first, ties to the lower page:
    the engine's ranking (a stable descending sort, as `store_top_pages_ref`)."""
    return scores[:, :-1].sort(dim=1, descending=True, stable=True).indices


def select(scores: torch.Tensor, budget_tokens: int, page_size: int = 64) -> torch.Tensor:
    """(Hkv, pages) bool: the pages the engine reads under a `budget_tokens` budget.

    The newest page plus the best `budget_tokens // page_size - 1` older pages (ties to the lower
    page); every page when the context's pages fit the budget's (`PageSelector.prepare`)."""
    hkv, pages = scores.shape
    budget_pages = max(1, budget_tokens // page_size)
    chosen = torch.zeros((hkv, pages), dtype=torch.bool)
    if pages <= budget_pages:
        return chosen.fill_(True)
    keep = budget_pages - 1
    if keep:
        chosen.scatter_(1, older_page_order(scores)[:, :keep], True)
    chosen[:, -1] = True
    return chosen


def kept_attention(mass: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(Hkv,): the share of each query head's attention `mass` (Hq, pages) on the `chosen`
    (Hkv, pages) pages of its KV head, averaged over the GQA group."""
    hkv, pages = chosen.shape
    per_head = (mass.view(hkv, -1, pages) * chosen[:, None].to(mass.dtype)).sum(-1)  # (Hkv, G)
    return per_head.mean(1)


def _layer_channels(channels: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    """(Hkv, r) channels of one layer from a (layers, Hkv, r) table."""
    return None if channels is None else channels[layer]


def recall(
    captures: Sequence[LayerCapture],
    kind: str,
    budgets: Sequence[int],
    query_indices: Sequence[int] | None = None,
    page_size: int = 64,
    logical: int = 16,
    channels: torch.Tensor | None = None,
    aggregate: str = "sum",
    label_fp8: bool = False,
) -> dict[int, torch.Tensor]:
    """{budget: (layers, Hkv)}: the share of the true attention that the `kind` selection keeps,
    per query head averaged over its GQA group, then averaged over the query positions
    (`query_indices` into the captured queries; all of them by default).

    channels: (layers, Hkv, r) for the channel scores (`label_fp8`: FP8 labels). Scores are computed once per query and
    reused for every budget."""
    indices = list(range(captures[0].num_queries)) if query_indices is None else list(query_indices)
    hkv = int(captures[0].keys.shape[1])
    out = {b: torch.zeros((len(captures), hkv), dtype=torch.float64) for b in budgets}
    for layer, cap in enumerate(captures):
        for qi in indices:
            mass = page_attention(cap, qi, page_size)
            scores = page_scores(kind, cap, qi, page_size, logical, _layer_channels(channels, layer), aggregate,
                                 label_fp8)
            for b in budgets:
                out[b][layer] += kept_attention(mass, select(scores, b, page_size))
    return {b: v / len(indices) for b, v in out.items()}


def needle_pages(needle: tuple[int, int], page_size: int = 64) -> list[int]:
    """The pages that the token range `needle` = (first, end), end exclusive, overlaps."""
    start, end = needle
    if not 0 <= start < end:
        raise LServeError(f"needle range {needle} is empty")
    return list(range(start // page_size, (end - 1) // page_size + 1))


def attention_on_pages(
    captures: Sequence[LayerCapture], pages: Sequence[int], query_indices: Sequence[int], page_size: int = 64,
) -> torch.Tensor:
    """(layers, Hkv, len(query_indices)): the true attention mass on `pages` (those the query
    sees), per query head averaged over its GQA group."""
    hkv = int(captures[0].keys.shape[1])
    out = torch.zeros((len(captures), hkv, len(query_indices)), dtype=torch.float64)
    for layer, cap in enumerate(captures):
        for j, qi in enumerate(query_indices):
            mass = page_attention(cap, qi, page_size)
            seen = [p for p in pages if p < mass.shape[1]]
            out[layer, :, j] = mass[:, seen].sum(1).view(hkv, -1).mean(1)
    return out


def needle_rank(
    captures: Sequence[LayerCapture],
    kind: str,
    needle: tuple[int, int],
    query_indices: Sequence[int],
    page_size: int = 64,
    logical: int = 16,
    channels: torch.Tensor | None = None,
    aggregate: str = "sum",
    label_fp8: bool = False,
) -> torch.Tensor:
    """(layers, Hkv, len(query_indices)) int64: the rank (0 = best) of the needle's page among
    the older pages under `kind`, in the engine's order (ties to the lower page).

    `needle` = (first, end) token positions (end exclusive). A needle over several pages counts
    its best-ranked page. A page is chosen at budget B iff its rank < B // page_size - 1; -1 means
    the needle lies in the newest page (always read)."""
    candidates = needle_pages(needle, page_size)
    hkv = int(captures[0].keys.shape[1])
    out = torch.full((len(captures), hkv, len(query_indices)), -1, dtype=torch.int64)
    for layer, cap in enumerate(captures):
        for j, qi in enumerate(query_indices):
            scores = page_scores(kind, cap, qi, page_size, logical, _layer_channels(channels, layer), aggregate,
                                 label_fp8)
            newest = scores.shape[1] - 1
            pages = [p for p in candidates if p < newest]
            if not pages:
                continue
            ranks = torch.argsort(older_page_order(scores), dim=1)  # (Hkv, older): page -> rank
            out[layer, :, j] = ranks[:, pages].amin(1)
    return out


def calibrate_label_channels(captures: Sequence[LayerCapture], r: int, method: str = "cross") -> torch.Tensor:
    """(layers, Hkv, r) int64, ascending: per (layer, KV head), the r key channels c with the
    largest mean |q_c| * |k_c|, where q is the sum of the GQA group's captured queries (the
    query the engine's "sum" aggregation scores with) and k runs over all captured keys.

    DoubleSparsity (andy-yang-1/DoubleSparse, `config/offline_calibration.py`) ranks the
    channels of each query head by the mean over calibration tokens t of |q_t,c * k_t,c| (each
    post-RoPE query with its own token's key, "every token only attend to itself"), sorted
    descending, and keeps the first r. `method="cross"` (the default) averages over every
    (captured query, key) pair instead, which factorises into mean|q_c| * mean|k_c|;
    `method="self"` is DoubleSparsity's diagonal statistic over the captured query positions.
    Both use the group-summed query, since the engine's selection is shared per KV head."""
    if method not in ("cross", "self"):
        raise LServeError(f"method={method!r}: expected 'cross' or 'self'")
    out = []
    for cap in captures:
        qn, hq, d = cap.queries.shape
        hkv = int(cap.keys.shape[1])
        if not 1 <= r <= d:
            raise LServeError(f"r={r} must lie in [1, {d}]")
        qsum = cap.queries.view(qn, hkv, hq // hkv, d).sum(2).double()  # (Q, Hkv, D)
        if method == "cross":
            importance = qsum.abs().mean(0) * cap.keys.double().abs().mean(0)
        else:
            own = cap.keys[cap.position(0):].double()  # the keys of the captured query positions
            importance = (qsum * own).abs().mean(0)
        top = importance.argsort(dim=-1, descending=True, stable=True)[:, :r]
        out.append(top.sort(dim=-1).values)
    return torch.stack(out).long()


@dataclass(frozen=True)
class RecallSummary:
    """One score's recall over a (layers, Hkv) table."""

    overall: float
    first_layers: float
    """Mean over layers 0-1."""
    other_layers: float
    """Mean over layers 2 and up."""
    worst: float
    worst_layer: int
    worst_head: int


def summarize_recall(per_head: torch.Tensor, first_layers: int = 2) -> RecallSummary:
    """Overall, first-layers, other-layers means and the worst (layer, KV head) of a (layers, Hkv) table."""
    t = per_head.double()
    worst = int(t.argmin())
    rest = t[first_layers:] if t.shape[0] > first_layers else t
    return RecallSummary(float(t.mean()), float(t[:first_layers].mean()), float(rest.mean()),
                         float(t.view(-1)[worst]), worst // t.shape[1], worst % t.shape[1])


@dataclass
class SelectionReport:
    """Every number of a selection-recall run, JSON-ready via `to_json`.

    `recall[score][budget]` holds one (layers, Hkv) table per prompt; `needle_rank[score]` one
    (layers, Hkv, steps) table per prompt (step 0: the last prompt position)."""

    model: str
    page_size: int
    logical_page_size: int
    aggregate: str
    budgets: list[int]
    prompts: list[dict[str, Any]] = field(default_factory=list)
    recall: dict[str, dict[int, list[list[list[float]]]]] = field(default_factory=dict)
    needle_rank: dict[str, list[list[list[list[int]]]]] = field(default_factory=dict)
    needle_mass: list[list[list[list[float]]]] = field(default_factory=list)
    """Per prompt, (layers, Hkv, steps): the true attention on the needle's pages (`attention_on_pages`)."""
    page0_mass: list[list[list[list[float]]]] = field(default_factory=list)
    """Per prompt, (layers, Hkv, steps): the true attention on page 0 (the sink)."""
    channels: dict[str, list[list[list[int]]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def add_recall(self, score: str, per_budget: dict[int, torch.Tensor]) -> None:
        """Append one prompt's `recall` result for `score`."""
        for b, table in per_budget.items():
            self.recall.setdefault(score, {}).setdefault(b, []).append(table.tolist())

    def add_needle_rank(self, score: str, ranks: torch.Tensor) -> None:
        """Append one prompt's `needle_rank` result for `score`."""
        self.needle_rank.setdefault(score, []).append(ranks.tolist())

    def mean_recall(self, score: str, budget: int) -> torch.Tensor:
        """(layers, Hkv): recall averaged over the prompts."""
        return torch.tensor(self.recall[score][budget], dtype=torch.float64).mean(0)

    def summary(self, score: str, budget: int) -> RecallSummary:
        return summarize_recall(self.mean_recall(score, budget))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (budgets as string keys), with the summaries added."""
        data = asdict(self)
        data["recall"] = {s: {str(b): v for b, v in per.items()} for s, per in self.recall.items()}
        data["summary"] = {s: {str(b): asdict(self.summary(s, b)) for b in per} for s, per in self.recall.items()}
        return data
