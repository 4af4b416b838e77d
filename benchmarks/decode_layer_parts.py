"""One layer's sparse-attention work in a decode step, part by part, as the engine calls it.

    python benchmarks/decode_layer_parts.py [--lengths 65536,262144] [--batches 1,8]

Llama-3-8B attention shape (32 query heads, 8 KV heads, head dim 128, bf16, page 64) with 50%
streaming heads: the ring pool holds KV heads 1, 3, 5, 7 (sink 128, local 256 in decode), the
paged pool heads 0, 2, 4, 6 with a 4096-token budget (63 stored pages + the newest pages) read
through the page selector's store (`StoredSelection`). Both pools reach their heads in the
model's q/out through a head map, as in a CUDA-graph decode step. Parts:

- ring decode and page-list decode, for several split counts (each split beyond one adds the
  merge kernel): the split count the engine chooses is marked;
- page selection of one layer: Quest scores (through the head map) + `store_top_pages` (one
  kernel) against the scores + `torch.topk`/sort/scatter path it replaced; the midrange and
  channel scores (r = 8 and 16 RoPE channels) and rope_mass (r = 16) beside Quest's, and
  `store_top_pages` with a top-p budget.

Times are medians of a CUDA graph of 20 calls (no launch overhead), in microseconds. Checks
first: `store_top_pages` equals its reference on the real-size scores, and every split count
gives the same attention output (to rounding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_kernels import bench_graph  # noqa: E402

from lserve.ops import reference as ref  # noqa: E402
from lserve.ops.page_scores import channel_page_scores, page_scores, store_top_pages  # noqa: E402
from lserve.ops.paged_inputs import StoredSelection, TopP  # noqa: E402
from lserve.ops.sparse_decode import _num_sms, choose_num_splits, sparse_decode  # noqa: E402

HQ, HKV, D, PAGE, LOGICAL = 32, 8, 128, 64, 16
GROUP = HQ // HKV
DT = torch.bfloat16
DEV = torch.device("cuda")
SINK, LOCAL, BUDGET, INTERVAL = 128, 256, 4096, 4


def old_select(scores: torch.Tensor, plan: torch.Tensor, store: torch.Tensor, keep: int) -> None:
    """The path `store_top_pages` replaced (PageSelector.update until 2026-11-29)."""
    nd, _, width = scores.shape
    redo, anchor, seats = plan[0, :nd].bool()[:, None, None], plan[3, :nd], plan[4, :nd]
    not_older = torch.arange(width, device=scores.device)[None, None, :] >= anchor[:, None, None]
    top = scores.masked_fill(not_older, float("-inf")).topk(keep, dim=2, sorted=False).indices
    top = top.sort(dim=2).values.to(torch.int32)
    store[seats] = torch.where(redo, top, store[seats])


def layer_parts(seq_len: int, batch: int, splits: list[int]) -> list[str]:
    gen = torch.Generator(device=DEV).manual_seed(seq_len + batch)
    n_pages = -(-seq_len // PAGE)
    dense_heads = torch.tensor([0, 2, 4, 6], device=DEV)
    ring_heads = torch.tensor([1, 3, 5, 7], device=DEV)
    h = len(dense_heads)
    qkv = torch.randn((batch, HQ + 2 * HKV, D), dtype=DT, device=DEV, generator=gen)
    q = qkv[:, :HQ]  # a view of the projection, as the model gives it
    out = torch.zeros((batch, HQ, D), dtype=DT, device=DEV)  # each pool writes only its heads' rows
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=DEV)
    scale = D**-0.5
    # paged pool: the dense heads' pages, scattered; key statistics per logical page
    k = torch.randn((batch * n_pages, PAGE, h, D), dtype=DT, device=DEV, generator=gen)
    v = torch.randn_like(k)
    table = torch.randperm(batch * n_pages, device=DEV, generator=gen).to(torch.int32).view(batch, n_pages)
    rows = k.view(-1, LOGICAL, h, D)
    k_min, k_max = rows.amin(1).contiguous(), rows.amax(1).contiguous()
    # ring pool: sink pages then a ring of (local + one page) tokens per sequence
    sink_pages, ring_pages = -(-SINK // PAGE), -(-LOCAL // PAGE) + 1
    per_seq = sink_pages + ring_pages
    rk = torch.randn((batch * per_seq + 1, PAGE, h, D), dtype=DT, device=DEV, generator=gen)
    rv = torch.randn_like(rk)
    idx = torch.arange(n_pages, device=DEV)
    ring_index = torch.where(idx < sink_pages, idx, sink_pages + (idx - sink_pages) % ring_pages)
    ring_table = (torch.arange(batch, device=DEV)[:, None] * per_seq + ring_index[None, :]).to(torch.int32)
    flags = torch.ones(h, dtype=torch.int8, device=DEV)
    # the selector's store and plan: every row re-selects (select step) or reuses (reuse step)
    keep = BUDGET // PAGE - 1
    tail = -(-INTERVAL // PAGE) + 1
    store = torch.zeros((batch + 1, h, keep), dtype=torch.int32, device=DEV)
    plan = torch.zeros((5, batch + 1), dtype=torch.int64, device=DEV)
    plan[0, :batch], plan[2, :batch], plan[3, :batch] = 1, n_pages, n_pages - 1
    plan[4, :batch] = torch.arange(batch, device=DEV)
    plan[4, batch] = batch
    plan[1, batch], plan[2, batch] = 1, 1
    sel = StoredSelection(store, plan, keep, keep + tail)

    def scores() -> torch.Tensor:
        return page_scores(q, k_min, k_max, table, lens, PAGE, LOGICAL, "sum", kv_head_map=dense_heads, group=GROUP)

    # checks: the one-kernel selection equals its reference at this size; splits agree
    s = scores()
    want = store.clone()
    ref.store_top_pages_ref(s, plan, want, keep)
    store_top_pages(s, plan, store, keep)
    assert torch.equal(store, want), "store_top_pages differs from its reference"
    rows_out = []
    sms = _num_sms(DEV)

    def ring_call(n: int) -> torch.Tensor:
        return sparse_decode(q, rk, rv, ring_table, lens, scale, streaming_heads=flags, sink=SINK, local=LOCAL,
                             kv_head_map=ring_heads, out=out, group=GROUP, num_splits=n,
                             block_n=128, num_warps=4, num_stages=3)

    def list_call(n: int) -> torch.Tensor:
        return sparse_decode(q, k, v, table, lens, scale, selection=sel, kv_head_map=dense_heads, out=out,
                             group=GROUP, num_splits=n, block_n=128, num_warps=4, num_stages=3)

    for name, call, virtual in (("ring decode", ring_call, SINK + LOCAL), ("page-list decode", list_call,
                                                                           sel.width * PAGE)):
        chosen = choose_num_splits(batch, h, virtual, sms)
        base = call(1).clone()
        for n in sorted(set(splits + [chosen])):
            got = call(n)
            err = float((got.float() - base.float()).abs().max())
            assert err < 2e-2, f"{name}: {n} splits differ from 1 split by {err}"
            t = bench_graph(lambda n=n: call(n)) * 1e3
            mark = " (engine)" if n == chosen else ""
            rows_out.append(f"| {seq_len // 1024}K | {batch} | {name}, {n} splits{mark} | {t:.1f} |")
    t_old = bench_graph(lambda: old_select(scores(), plan, store, keep)) * 1e3
    # each tiling with the statistics in L2 (graph replays back to back) and from HBM, as in a
    # decode step, where the weights flush L2 between layers: after a write of 96 MB, less the
    # write's own time
    flush = torch.empty(96 * 2**20, dtype=torch.uint8, device=DEV)
    t_flush = bench_graph(lambda: flush.zero_()) * 1e3
    for block_p, warps in ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8), (128, 8)):
        def call(bp=block_p, w=warps) -> torch.Tensor:
            return page_scores(q, k_min, k_max, table, lens, PAGE, LOGICAL, "sum", kv_head_map=dense_heads,
                               group=GROUP, block_p=bp, num_warps=w)

        t_hot = bench_graph(call) * 1e3
        t_cold = bench_graph(lambda call=call: (flush.zero_(), call())) * 1e3 - t_flush
        label = " (engine)" if (block_p, warps) == (64, 4) else ""
        rows_out.append(f"| {seq_len // 1024}K | {batch} | Quest scores, {block_p} pages x {warps} warps{label}, "
                        f"in L2 / from HBM | {t_hot:.1f} / {t_cold:.1f} |")
    rows_out.append(f"| {seq_len // 1024}K | {batch} | select: scores + topk/sort/scatter (before) | {t_old:.1f} |")
    t_new = bench_graph(lambda: store_top_pages(scores(), plan, store, keep)) * 1e3
    rows_out.append(f"| {seq_len // 1024}K | {batch} | select: Quest scores + store_top_pages | {t_new:.1f} |")
    # the other page scores, in L2 / from HBM, and their whole selection
    slots = k.view(-1, h, D)
    others = {"midrange scores": lambda: page_scores(q, k_min, k_max, table, lens, PAGE, LOGICAL, "sum",
                                                     kv_head_map=dense_heads, group=GROUP, midrange=True)}
    for r in (8, 16):
        chans = torch.arange(D // 2 - r // 2, D // 2, device=DEV)
        chans = torch.cat([chans, chans + D // 2]).to(torch.int32)[None].expand(h, -1).contiguous()
        labels = torch.gather(slots, 2, chans.long()[None].expand(slots.shape[0], -1, -1)).transpose(0, 1).contiguous()
        others[f"RoPE channel scores, r = {r}"] = lambda lab=labels, ch=chans: channel_page_scores(
            q, lab, ch, table, lens, PAGE, "sum", kv_head_map=dense_heads, group=GROUP)
        if r == 16:
            others["rope_mass scores, r = 16"] = lambda lab=labels, ch=chans: channel_page_scores(
                q, lab, ch, table, lens, PAGE, "sum", kv_head_map=dense_heads, group=GROUP, mass=True)
    for label, call in others.items():
        t_hot = bench_graph(call) * 1e3
        t_cold = bench_graph(lambda call=call: (flush.zero_(), call())) * 1e3 - t_flush
        t_sel = bench_graph(lambda call=call: store_top_pages(call(), plan, store, keep)) * 1e3
        rows_out.append(f"| {seq_len // 1024}K | {batch} | {label}, in L2 / from HBM; select with it | "
                        f"{t_hot:.1f} / {t_cold:.1f}; {t_sel:.1f} |")
    # rope_mass's tiling: tokens per program x warps
    mass_labels, mass_chans = labels, chans  # the r = 16 labels of the loop above
    for block_tokens, warps in ((256, 4), (512, 4), (1024, 4), (2048, 4), (512, 8), (1024, 8), (2048, 8)):
        def call(bt=block_tokens, w=warps) -> torch.Tensor:
            return channel_page_scores(q, mass_labels, mass_chans, table, lens, PAGE, "sum", kv_head_map=dense_heads,
                                       group=GROUP, mass=True, block_tokens=bt, num_warps=w)

        t_hot = bench_graph(call) * 1e3
        t_cold = bench_graph(lambda call=call: (flush.zero_(), call())) * 1e3 - t_flush
        label = " (engine)" if (block_tokens, warps) == (512, 4) else ""
        rows_out.append(f"| {seq_len // 1024}K | {batch} | rope_mass scores, {block_tokens} tokens x {warps} warps{label}, "
                        f"in L2 / from HBM | {t_hot:.1f} / {t_cold:.1f} |")
    counts = torch.zeros((batch + 1, h), dtype=torch.int32, device=DEV)
    top_p = TopP(0.9, scale / GROUP, 4, counts)
    t_p = bench_graph(lambda: store_top_pages(s, plan, store, keep, top_p=top_p)) * 1e3
    rows_out.append(f"| {seq_len // 1024}K | {batch} | store_top_pages alone with top-p 0.9, Quest scores | {t_p:.1f} |")
    # the search's rounds depend on the scores: the Quest scores above, and close scores; a
    # bisection (fanout 2) against the engine's 4 thresholds a round
    s_close = 1.0 + torch.rand(s.shape, device=DEV, generator=gen) * 1e-3
    for label, data in (("Quest scores", s), ("close scores", s_close)):
        for fanout in (2, 4):
            times = [bench_graph(lambda w=warps, f=fanout: store_top_pages(data, plan, store, keep, num_warps=w,
                                                                           fanout=f)) * 1e3 for warps in (4, 8, 16)]
            rows_out.append(f"| {seq_len // 1024}K | {batch} | store_top_pages alone, {label}, fanout {fanout}, "
                            f"4/8/16 warps | {' / '.join(f'{t:.1f}' for t in times)} |")
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="65536,262144")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--splits", default="1,2,4,8,16,32")
    args = ap.parse_args()
    splits = [int(x) for x in args.splits.split(",")]
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; Llama-3-8B attention shape, "
          f"50% streaming (sink {SINK}, local {LOCAL}), budget {BUDGET}, page {PAGE}, logical {LOGICAL}")
    print("\n| tokens | batch | part (one layer) | us |\n|---|---|---|---|")
    for s in [int(x) for x in args.lengths.split(",")]:
        for b in [int(x) for x in args.batches.split(",")]:
            print("\n".join(layer_parts(s, b, splits)), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
