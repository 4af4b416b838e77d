"""Plain-PyTorch references for every op in `lserve.ops`: slow, obvious, and the tests' oracle.

Shapes follow the KV cache layout (`kv_cache/layout.py`): per layer, K and V are
`(num_pages, page_size, Hkv, D)`; a token's slot is `page_id * page_size + offset`. Key statistics
are `(num_pages * page_size // logical_page_size, Hkv, D)`: one row per logical page.

Masks. For a query at position i and a key at position j of the same sequence:
- dense heads see j <= i;
- streaming heads see j <= i and (j < sink or i - j < local) (the Λ-shaped mask);
- with an explicit page list, a key is also hidden unless its page (j // page_size) is listed.
"""

from __future__ import annotations

import torch

from lserve.kv_cache.fp8 import quantize, write_rows
from lserve.ops.paged_inputs import PlanView, TopP


def kv_append_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_min: torch.Tensor | None = None,
    k_max: torch.Tensor | None = None,
    logical_page_size: int = 16,
    stats_heads: torch.Tensor | None = None,
    k_label: torch.Tensor | None = None,
    label_channels: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    label_scale: torch.Tensor | None = None,
) -> None:
    """Write k, v (T, Hkv, D) at `slots` (T,); update min/max of the touched logical pages, or
    write the new keys' labels: `k_label[h, slot, j] = k[t, h, label_channels[h, j]]`, FP8 labels
    (with `label_scale` (Hkv, slots)) as `kv_cache.fp8.quantize` of each token's r label values.
    FP8 caches (with `k_scale`/`v_scale` (num_pages, Hkv, page_size)) store `kv_cache.fp8.quantize`
    of each token's rows and their scales; statistics and labels come from the unquantized keys.

    A logical page whose offset-0 token is among the new tokens starts fresh (its old statistics
    are stale: they belong to whoever used the page before); otherwise the new keys are merged
    into the existing statistics. `stats_heads` (Hkv,) bool limits statistics to those heads.
    """
    write_rows(k_cache, k_scale, k, slots)
    write_rows(v_cache, v_scale, v, slots)
    if k_label is not None and label_channels is not None:
        for t, slot in enumerate(slots.tolist()):
            for h in range(k.shape[1]):
                row = k[t, h, label_channels[h].long()]
                if label_scale is not None:
                    row, label_scale[h, slot] = quantize(row)
                k_label[h, slot] = row.to(k_label.dtype)
    if k_min is None or k_max is None:
        return
    heads = torch.ones(k.shape[1], dtype=torch.bool, device=k.device) if stats_heads is None else stats_heads
    logical = (slots // logical_page_size).tolist()
    fresh = (slots % logical_page_size == 0).tolist()
    for g in sorted(set(logical)):
        rows = [t for t, lg in enumerate(logical) if lg == g]
        keys = k[rows].float()  # (n, Hkv, D)
        lo, hi = keys.amin(0), keys.amax(0)
        if not any(fresh[t] for t in rows):
            lo = torch.minimum(lo, k_min[g].float())
            hi = torch.maximum(hi, k_max[g].float())
        k_min[g, heads] = lo[heads].to(k_min.dtype)
        k_max[g, heads] = hi[heads].to(k_max.dtype)


def gather_sequence(cache: torch.Tensor, page_ids: list[int] | torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from its pages: (length, Hkv, D)."""
    pages = cache[torch.as_tensor(page_ids, dtype=torch.long, device=cache.device)]
    return pages.reshape(-1, *cache.shape[2:])[:length]


def visibility_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    streaming: bool,
    sink: int,
    local: int,
) -> torch.Tensor:
    """(Q, K) bool: which keys each query may see (causal, plus the Λ window for streaming heads)."""
    i, j = q_pos[:, None], k_pos[None, :]
    mask = j <= i
    if streaming:
        mask &= (j < sink) | (i - j < local)
    return mask


def pages_mask(pages: list[int], page_size: int, length: int, device: torch.device) -> torch.Tensor:
    """(length,) bool: True for key positions inside the listed pages."""
    allowed = torch.zeros(length, dtype=torch.bool, device=device)
    for p in pages:
        allowed[p * page_size : (p + 1) * page_size] = True
    return allowed


def attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q (Q, D), k/v (K, D), mask (Q, K) -> (Q, D) in float64; rows with nothing visible are 0."""
    s = (q.double() @ k.double().T) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v.double()


def sparse_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    page_tables: list[list[int]],
    scale: float,
    streaming_heads: torch.Tensor | None = None,
    sink: int = 0,
    local: int = 0,
    page_lists: dict[tuple[int, int, int], list[int]] | None = None,
    q_tile: int = 128,
) -> torch.Tensor:
    """Attention of every new token over its sequence's cached keys (new keys already written).

    q (T, Hq, D); sequence s owns rows query_start_loc[s]:query_start_loc[s+1], which are its last
    tokens. `streaming_heads` (Hkv,) bool. `page_lists[(s, tile, kv_head)]` restricts the keys of
    query tile `tile` (rows tile*q_tile.. of the sequence's new tokens) to the listed pages.
    """
    _, hq, _ = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    page_size = k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for s, seq_len in enumerate(seq_lens):
        a, b = query_start_loc[s], query_start_loc[s + 1]
        keys = gather_sequence(k_cache, page_tables[s], seq_len)
        values = gather_sequence(v_cache, page_tables[s], seq_len)
        q_pos = torch.arange(seq_len - (b - a), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        for h in range(hq):
            kh = h // group
            is_streaming = bool(streaming_heads[kh]) if streaming_heads is not None else False
            mask = visibility_mask(q_pos, k_pos, is_streaming, sink, local)
            if page_lists is not None:
                for r in range(b - a):
                    mask[r] &= pages_mask(page_lists.get((s, r // q_tile, kh), []), page_size, seq_len, q.device)
            out[a:b, h] = attend_ref(q[a:b, h], keys[:, kh], values[:, kh], mask, scale)
    return out


def sparse_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: list[int],
    page_tables: list[list[int]],
    scale: float,
    streaming_heads: torch.Tensor | None = None,
    sink: int = 0,
    local: int = 0,
    page_lists: dict[tuple[int, int], list[int]] | None = None,
) -> torch.Tensor:
    """One query per sequence (its last token): q (B, Hq, D) -> (B, Hq, D) float64.

    `page_lists[(b, kv_head)]` lists the logical pages (indices into the page table) a dense head
    reads; heads without an entry read every page. Streaming heads read the Λ window.
    """
    bsz, hq, _ = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    page_size = k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for s, seq_len in enumerate(seq_lens):
        keys = gather_sequence(k_cache, page_tables[s], seq_len)
        values = gather_sequence(v_cache, page_tables[s], seq_len)
        q_pos = torch.tensor([seq_len - 1], device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        for h in range(hq):
            kh = h // group
            is_streaming = bool(streaming_heads[kh]) if streaming_heads is not None else False
            mask = visibility_mask(q_pos, k_pos, is_streaming, sink, local)
            if not is_streaming and page_lists is not None and (s, kh) in page_lists:
                mask &= pages_mask(page_lists[(s, kh)], page_size, seq_len, q.device)
            out[s, h] = attend_ref(q[s, h][None], keys[:, kh], values[:, kh], mask, scale)[0]
    return out


def merge_states_ref(partial_out: torch.Tensor, partial_lse: torch.Tensor) -> torch.Tensor:
    """Combine split-K partials: out (..., S, D), lse (..., S) natural-log sum-exp -> (..., D)."""
    lse = partial_lse.double()
    m = lse.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)  # splits with nothing visible have lse = -inf -> weight 0
    total = w.sum(-1, keepdim=True)
    return (partial_out.double() * w[..., None]).sum(-2) / total.clamp_min(1e-300)


def page_scores_ref(
    q: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    page_tables: list[list[int]],
    seq_lens: list[int],
    page_size: int,
    logical_page_size: int,
    aggregate: str = "max",
    midrange: bool = False,
) -> torch.Tensor:
    """Quest bound per logical page, max over each physical page's logical pages, aggregated over
    the GQA group's query heads: (B, Hkv, max_pages) float64, -inf past each sequence.
    `midrange`: q . (kmin + kmax) / 2 instead of the bound."""
    bsz, hq, _ = q.shape
    hkv = k_min.shape[1]
    group = hq // hkv
    sub = page_size // logical_page_size
    width = max(len(t) for t in page_tables)
    out = torch.full((bsz, hkv, width), float("-inf"), dtype=torch.float64)
    for b, (table, n) in enumerate(zip(page_tables, seq_lens)):
        for p in range(-(-n // page_size)):
            for h in range(hkv):
                best = float("-inf")
                for s in range(sub):
                    if p * page_size + s * logical_page_size >= n:
                        continue
                    row = table[p] * sub + s
                    hi, lo = k_max[row, h].double(), k_min[row, h].double()
                    per_head = [
                        float((q[b, qh].double() * (hi + lo) / 2).sum()) if midrange
                        else float(torch.maximum(q[b, qh].double() * hi, q[b, qh].double() * lo).sum())
                        for qh in range(h * group, (h + 1) * group)
                    ]
                    agg = max(per_head) if aggregate == "max" else sum(per_head)
                    best = max(best, agg)
                out[b, h, p] = best
    return out


def channel_page_scores_ref(
    q: torch.Tensor,
    k_label: torch.Tensor,
    label_channels: torch.Tensor,
    page_tables: list[list[int]],
    seq_lens: list[int],
    page_size: int,
    aggregate: str = "sum",
    mass: bool = False,
    label_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Channel score of each physical page: the max over its tokens of the partial dot product
    on the label channels, q_C . k_C, aggregated over the GQA group (sum: of the group's queries,
    before the product; max: of the per-head products). q (B, Hq, D), k_label (Hkv, slots, r),
    label_channels (Hkv, r) -> (B, Hkv, max_pages) float64, -inf past each sequence.

    `mass`: instead, log sum over the group's heads g and the page's tokens t of
    exp(q_gC . k_tC / tau_g), tau_g = sqrt(D |q_gC|_1 / |q_g|_1) (the `rope_mass` score).
    FP8 labels take their `label_scale` (Hkv, slots): a label is its value times its token's scale."""
    bsz, hq, _ = q.shape
    hkv = k_label.shape[0]
    group = hq // hkv
    width = max(len(t) for t in page_tables)
    out = torch.full((bsz, hkv, width), float("-inf"), dtype=torch.float64)
    for b, (table, n) in enumerate(zip(page_tables, seq_lens)):
        for h in range(hkv):
            chans = label_channels[h].long()
            qc = q[b, h * group : (h + 1) * group][:, chans].double()  # (group, r)
            for p in range(-(-n // page_size)):
                slots = [table[p] * page_size + t for t in range(page_size) if p * page_size + t < n]
                labels = k_label[h, slots].double()  # (tokens, r)
                if label_scale is not None:
                    labels = labels * label_scale[h, slots].double()[:, None]
                if mass:
                    qg = q[b, h * group : (h + 1) * group].double()
                    tau = (q.shape[2] * qc.abs().sum(1) / qg.abs().sum(1).clamp_min(1e-30)).sqrt().clamp_min(1e-20)
                    out[b, h, p] = float(torch.logsumexp((labels @ qc.T) / tau, dim=(0, 1)))
                    continue
                if aggregate == "sum":
                    per_token = labels @ qc.sum(0)
                else:
                    per_token = (labels @ qc.T).amax(1)
                out[b, h, p] = float(per_token.max())
    return out


def store_top_pages_ref(
    scores: torch.Tensor, plan: torch.Tensor, store: torch.Tensor, keep: int, top_p: TopP | None = None
) -> None:
    """`ops.page_scores.store_top_pages` in PyTorch (also the torch backend's path): a stable
    descending sort of the pages before each row's anchor, the first `keep`, ascending. With
    `top_p`, page 0 and the fewest best other older pages whose estimated softmax mass, with the
    pages from the anchor on, reaches p of the sequence's (between `min_keep` and `keep` pages)."""
    nd, heads, width = scores.shape
    if keep == 0 or nd == 0:
        return
    view = PlanView.of(plan, nd)
    redo, anchor, seats = view.recompute.bool(), view.anchor, view.seat
    older = torch.arange(width, device=scores.device)[None, None, :] < anchor[:, None, None]
    ranked_scores = scores.masked_fill(~older, float("-inf"))
    if top_p is None:
        ranked = ranked_scores.sort(dim=2, descending=True, stable=True).indices
        top = ranked[:, :, :keep].sort(dim=2).values.to(store.dtype)
        store[seats, :, :keep] = torch.where(redo[:, None, None], top, store[seats, :, :keep])
        return
    for b in range(nd):
        if not bool(redo[b]):
            continue
        for h in range(heads):
            n = _pages_kept_ref(scores[b, h], int(anchor[b]), top_p, keep)
            row = ranked_scores[b, h].clone()
            row[0] = float("inf")  # the sink page first
            chosen = row.sort(descending=True, stable=True).indices[:n].sort().values
            store[seats[b], h, :n] = chosen.to(store.dtype)
            top_p.counts[seats[b], h] = n


def _pages_kept_ref(s: torch.Tensor, anchor: int, top_p: TopP, keep: int) -> int:
    """How many older pages a top-p selection keeps for one (row, head) (page 0 included)."""
    valid = torch.isfinite(s)
    s64 = s.double()
    w = torch.where(valid, torch.exp((s64 - s64[valid].max()) * top_p.temperature), torch.zeros_like(s64))
    pages = torch.arange(s.shape[0], device=s.device)
    forced = valid & ((pages >= anchor) | (pages == 0))
    need = top_p.p * float(w.sum()) - float(w[forced].sum())
    if top_p.p >= 1.0:
        return keep
    n = 0
    if need > 0:
        cand = sorted(range(1, anchor), key=lambda i: -float(s[i]))
        mass = 0.0
        for i in cand:
            mass += float(w[i])
            n += 1
            if mass >= need:
                break
        # pages tied with the last one taken come along (the kernel's threshold takes ties)
        last = float(s[cand[n - 1]]) if n else None
        n += sum(1 for i in cand[n:] if float(s[i]) == last)
    return min(max(n + 1, top_p.min_keep), keep)
