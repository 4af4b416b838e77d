"""Scratch GPU micro-benchmark: rope_mass score and top-page store variants at 256K (Llama-3-8B shape).

    PYTHONPATH=src:. python benchmarks/results/selection_kernels_ruler_gpu_2026-12-06/bench_mass.py

(run from the repository root; it ran from a copy in another folder, with the engine of commit 659d57d
and the store's fanout of 752ecb3: "engine rope_mass" is the kernel before 752ecb3.)"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_kernels import bench_graph
from mass_variants import mass2d
from lserve.ops.page_scores import channel_page_scores, store_top_pages
from lserve.ops.reference import store_top_pages_ref

DEV = torch.device("cuda")
print("#", torch.cuda.get_device_name())
HQ, HKV, D, G = 32, 8, 128, 4
heads = torch.tensor([0, 2, 4, 6], device=DEV)
flush = torch.empty(96 * 2**20, dtype=torch.uint8, device=DEV)
t_flush = bench_graph(lambda: flush.zero_()) * 1e3
def both(fn):
    return bench_graph(fn) * 1e3, bench_graph(lambda: (flush.zero_(), fn())) * 1e3 - t_flush
import os
CASES = eval(os.environ.get("CASES", "((262144, 64, 16), (262144, 16, 16), (262144, 64, 8), (65536, 64, 16))"))
for seq, page, r in CASES:
    gen = torch.Generator(device=DEV).manual_seed(seq + page)
    n_pages = seq // page
    q = torch.randn((1, HQ + 2 * HKV, D), dtype=torch.bfloat16, device=DEV, generator=gen)[:, :HQ]
    lab = torch.randn((4, n_pages * page, r), dtype=torch.bfloat16, device=DEV, generator=gen)
    ch = torch.arange(D // 2 - r // 2, D // 2, device=DEV)
    ch = torch.cat([ch, ch + D // 2]).to(torch.int32)[None].expand(4, -1).contiguous()
    table = torch.randperm(n_pages, device=DEV, generator=gen).to(torch.int32).view(1, n_pages)
    lens = torch.full((1,), seq, dtype=torch.int32, device=DEV)
    ref = channel_page_scores(q, lab, ch, table, lens, page, "sum", kv_head_map=heads, group=G, mass=True)
    tag = f"{seq // 1024}K p{page} r{r}"
    h, c = both(lambda: channel_page_scores(q, lab, ch, table, lens, page, "sum", kv_head_map=heads, group=G, mass=True))
    print(f"| {tag} | engine rope_mass 1024x4 | {h:.1f} / {c:.1f} | - |")
    h, c = both(lambda: channel_page_scores(q, lab, ch, table, lens, page, "sum", kv_head_map=heads, group=G))
    print(f"| {tag} | engine rope_channels sum 1024x4 | {h:.1f} / {c:.1f} | - |")
    for dot in (True, False):
        for bt, w in ((512, 4), (1024, 4), (2048, 4), (1024, 8), (2048, 8), (4096, 8)):
            try:
                got = mass2d(q, lab, ch, table, lens, page, kv_head_map=heads, group=G, block_tokens=bt,
                             num_warps=w, dot=dot)
                err = float((got - ref).abs().max())
                h, c = both(lambda: mass2d(q, lab, ch, table, lens, page, kv_head_map=heads, group=G,
                                           block_tokens=bt, num_warps=w, dot=dot))
                print(f"| {tag} | mass2d dot={dot} {bt}x{w} | {h:.1f} / {c:.1f} | {err:.2e} |")
            except Exception as e:  # noqa: BLE001
                print(f"| {tag} | mass2d dot={dot} {bt}x{w} | failed: {type(e).__name__}: {str(e)[:200]} |")
    # stores
    keep = 4096 // page - 1
    plan = torch.zeros((5, 2), dtype=torch.int64, device=DEV)
    plan[0, 0], plan[2, 0], plan[3, 0], plan[4, 0] = 1, n_pages, n_pages - 1, 0
    store = torch.zeros((2, 4, keep), dtype=torch.int32, device=DEV)
    close = 1.0 + torch.rand(ref.shape, device=DEV, generator=gen) * 1e-3
    for name, sc in (("mass", ref), ("close", close)):
        want = store.clone()
        store_top_pages_ref(sc, plan, want, keep)
        for k in (2, 4, 8, 16, 32):
            w1 = store.clone()
            store_top_pages(sc, plan, w1, keep, fanout=k)
            ok = torch.equal(w1, want)
            ts = [bench_graph(lambda w=w, k=k: store_top_pages(sc, plan, store, keep, num_warps=w, fanout=k)) * 1e3
                  for w in (4, 8, 16)]
            print(f"| {tag} | store fanout {k} {name} 4/8/16 warps | {' / '.join(f'{t:.1f}' for t in ts)} | equal={ok} |")
