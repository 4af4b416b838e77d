"""Scratch GPU micro-benchmark: packed rope_mass vs the engine's kernel before it; the top-page
search with compare rounds (fanout 4) vs radix rounds (histograms); Llama-3-8B shape at 256K."""
import os
import sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".gpu")
from attention_kernels import bench_graph
import old_page_scores as old
from lserve.ops.page_scores import channel_page_scores, store_top_pages
from lserve.ops.reference import store_top_pages_ref

DEV = torch.device("cuda")
print("#", torch.cuda.get_device_name(), "torch", torch.__version__)
HQ, HKV, D, G = 32, 8, 128, 4
heads = torch.tensor([0, 2, 4, 6], device=DEV)
flush = torch.empty(96 * 2**20, dtype=torch.uint8, device=DEV)
t_flush = bench_graph(lambda: flush.zero_()) * 1e3
def both(fn):
    return bench_graph(fn) * 1e3, bench_graph(lambda: (flush.zero_(), fn())) * 1e3 - t_flush
CASES = ((262144, 64, 16, "bf16"), (262144, 64, 32, "bf16"), (262144, 16, 16, "bf16"), (262144, 64, 32, "fp8"))
from lserve.kv_cache.fp8 import quantize
for seq, page, r, ldt in CASES:
    gen = torch.Generator(device=DEV).manual_seed(seq + page)
    n_pages = seq // page
    q = torch.randn((1, HQ + 2 * HKV, D), dtype=torch.bfloat16, device=DEV, generator=gen)[:, :HQ]
    lab = torch.randn((4, n_pages * page, r), dtype=torch.bfloat16, device=DEV, generator=gen)
    scale = None
    if ldt == "fp8":
        lab, scale = quantize(lab.float())
    ch = torch.arange(D // 2 - r // 2, D // 2, device=DEV)
    ch = torch.cat([ch, ch + D // 2]).to(torch.int32)[None].expand(4, -1).contiguous()
    table = torch.randperm(n_pages, device=DEV, generator=gen).to(torch.int32).view(1, n_pages)
    lens = torch.full((1,), seq - 37, dtype=torch.int32, device=DEV)
    tag = f"{seq // 1024}K p{page} r{r} {ldt}"
    kw = dict(kv_head_map=heads, group=G, mass=True, label_scale=scale)
    ref = old.channel_page_scores(q, lab, ch, table, lens, page, "sum", **kw)
    h, c = both(lambda: old.channel_page_scores(q, lab, ch, table, lens, page, "sum", **kw))
    print(f"| {tag} | rope_mass before (512 x 4) | {h:.1f} / {c:.1f} | - |", flush=True)
    for bt, w in ((512, 4), (1024, 4), (2048, 4), (1024, 8), (2048, 8)):
        try:
            got = channel_page_scores(q, lab, ch, table, lens, page, "sum", block_tokens=bt, num_warps=w, **kw)
            fin = torch.isfinite(ref)
            err = float((got[fin] - ref[fin]).abs().max())
            same_inf = bool(torch.equal(torch.isfinite(got), fin))
            h, c = both(lambda: channel_page_scores(q, lab, ch, table, lens, page, "sum", block_tokens=bt,
                                                    num_warps=w, **kw))
            print(f"| {tag} | packed {bt} x {w} | {h:.1f} / {c:.1f} | err {err:.2e} inf-equal {same_inf} |",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"| {tag} | packed {bt} x {w} | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
    if ldt != "bf16" or r != 16:
        continue
    keep = 4096 // page - 1
    plan = torch.zeros((5, 2), dtype=torch.int64, device=DEV)
    plan[0, 0], plan[2, 0], plan[3, 0], plan[4, 0] = 1, n_pages, n_pages - 1, 0
    store = torch.zeros((2, 4, keep), dtype=torch.int32, device=DEV)
    close = 1.0 + torch.rand(ref.shape, device=DEV, generator=gen) * 1e-3
    mixed = torch.randn(ref.shape, device=DEV, generator=gen) * 3
    for name, sc in (("mass", ref), ("close", close), ("mixed-sign", mixed)):
        want = store.clone()
        store_top_pages_ref(sc, plan, want, keep)
        for k in (4, 64, 256):
            try:
                w1 = store.clone()
                store_top_pages(sc, plan, w1, keep, fanout=k)
                ok = torch.equal(w1, want)
                ts = [bench_graph(lambda w=w, k=k: store_top_pages(sc, plan, store, keep, num_warps=w, fanout=k))
                      * 1e3 for w in (4, 8, 16)]
                print(f"| {tag} | store fanout {k} {name} 4/8/16 warps | {' / '.join(f'{t:.1f}' for t in ts)} "
                      f"| equal={ok} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {tag} | store fanout {k} {name} | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
