"""lserve's Triton attention kernels next to PyTorch SDPA, Llama-3-8B attention shape, one run.

    python benchmarks/attention_kernels.py [--prefill 8192,32768,131072] [--decode 32768,131072,262144]
        [--kv-cache-dtype fp8]

Shape: 32 query heads, 8 KV heads, head dim 128, bfloat16, page size 64. Prefill: one sequence
of S tokens whose K/V are already in the paged cache (the engine appends them first); SDPA gets
contiguous K/V. "50% streaming": KV heads 1, 3, 5, 7 are streaming heads (sink 128, local 8192).
Decode: one query per sequence over S cached tokens; the sparse case adds a 4096-token page list
(64 pages, the newest included) on the dense heads and sink 128 / local 256 on streaming heads.
TFLOP/s counts the causal FLOPs each variant must do; TB/s counts the K/V bytes each variant
reads. Times are medians of `triton.testing.do_bench`. `--kv-cache-dtype fp8` runs lserve's kernels
over FP8 pages (E4M3 values and a float32 scale per token and head, `kv_cache.fp8`) and counts
their bytes; SDPA stays in bfloat16 (the ratio column is then FP8 lserve against BF16 SDPA). An
FP8 prefill is timed as the engine runs it: the sequence's pages dequantized into a bfloat16 copy
(`ops.fp8.dequantize_listed_pages`), then the prefill kernel over the copy.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from lserve.kv_cache.fp8 import quantize_pages
from lserve.ops.fp8 import dequantize_listed_pages
from lserve.ops.sparse_decode import sparse_decode
from lserve.ops.sparse_prefill import plan_tiles, sparse_prefill

HQ, HKV, D, PAGE = 32, 8, 128, 64
DT = torch.bfloat16
DEV = torch.device("cuda")


FP8 = False
"""--kv-cache-dtype fp8: the paged caches hold FP8 values and scales."""


def paged_cache(batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """K, V pages, the page table and the kernels' scale arguments (empty unless FP8)."""
    pages_per_seq = -(-seq_len // PAGE)
    num_pages = batch * pages_per_seq
    k = torch.randn((num_pages, PAGE, HKV, D), dtype=DT, device=DEV)
    v = torch.randn_like(k)
    perm = torch.randperm(num_pages, device=DEV).to(torch.int32)  # pages scattered over the pool
    scales = {}
    if FP8:
        k, k_scale = quantize_pages(k)
        v, v_scale = quantize_pages(v)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    return k, v, perm.view(batch, pages_per_seq), scales


def kv_elem_bytes() -> float:
    """Bytes per K or V element read, scales included."""
    return 1 + 4 / D if FP8 else 2


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median ms of one call."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fn, calls: int = 20) -> float:
    """Median ms of one call, replayed from a CUDA graph of `calls` calls: no host launch overhead,
    as in the engine's captured decode step."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm the caching allocator on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench(graph.replay) / calls


def causal_flops(s: int, heads: int) -> float:
    return 4.0 * heads * D * s * (s + 1) / 2


def streaming_flops(s: int, heads: int, sink: int, local: int) -> float:
    visible = sum(min(i + 1, local) + min(sink, max(0, i + 1 - local)) for i in range(0, s, 64)) * 64
    return 4.0 * heads * D * visible


def prefill_rows(lengths: list[int], cfg: dict) -> list[str]:
    rows = []
    stream = torch.tensor([i % 2 for i in range(HKV)], dtype=torch.int8, device=DEV)
    sink, local = 128, 8192
    for s in lengths:
        q = torch.randn((s, HQ, D), dtype=DT, device=DEV)
        k, v, table, scales = paged_cache(1, s)
        lens = torch.tensor([s], dtype=torch.int32, device=DEV)
        qsl = torch.tensor([0, s], dtype=torch.int32, device=DEV)
        tiles = plan_tiles([s], cfg["block_m"], DEV)
        kw = dict(block_n=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                  use_tma=cfg.get("use_tma", False))
        prefill = staged_prefill(k, v, table, scales) if scales else sparse_prefill
        qs = q.transpose(0, 1).unsqueeze(0)
        ks = torch.randn((1, HKV, s, D), dtype=DT, device=DEV)
        vs = torch.randn_like(ks)
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        scale = D**-0.5
        t_dense = bench(lambda: prefill(q, k, v, table, lens, qsl, tiles, scale, **kw))
        t_stream = bench(lambda: prefill(q, k, v, table, lens, qsl, tiles, scale, streaming_heads=stream,
                                                sink=sink, local=local, **kw))
        f_dense = causal_flops(s, HQ)
        f_stream = causal_flops(s, HQ // 2) + streaming_flops(s, HQ // 2, sink, local)
        for name, t, f in (("SDPA dense", t_sdpa, f_dense), ("lserve dense", t_dense, f_dense),
                           ("lserve 50% streaming", t_stream, f_stream)):
            rows.append(f"| {s // 1024}K | {name} | {t:.2f} | {f / t / 1e9:.0f} | {t_sdpa / t:.2f} |")
        del q, k, v, ks, vs
        torch.cuda.empty_cache()
    return rows


def decode_rows(lengths: list[int], batches: list[int], cfg: dict) -> list[str]:
    rows = []
    stream = torch.tensor([i % 2 for i in range(HKV)], dtype=torch.int8, device=DEV)
    elem = kv_elem_bytes()
    for s in lengths:
        for b in batches:
            q = torch.randn((b, HQ, D), dtype=DT, device=DEV)
            k, v, table, scales = paged_cache(b, s)
            lens = torch.full((b,), s, dtype=torch.int32, device=DEV)
            n_pages = table.shape[1]
            budget_pages = 64
            sel = torch.stack([torch.cat([torch.randperm(n_pages - 1, device=DEV)[: budget_pages - 1],
                                          torch.tensor([n_pages - 1], device=DEV)]).sort().values
                               for _ in range(b * HKV)]).view(b, HKV, budget_pages).to(torch.int32)
            sel_len = torch.full((b, HKV), budget_pages, dtype=torch.int32, device=DEV)
            kw = dict(block_n=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **scales)
            scale = D**-0.5
            ks = torch.randn((b, HKV, s, D), dtype=DT, device=DEV)
            vs = torch.randn_like(ks)
            qs = q.unsqueeze(2)
            t_sdpa = bench_graph(lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)) * 1e3
            t_dense = bench_graph(lambda: sparse_decode(q, k, v, table, lens, scale, max_seq_len=s, **kw)) * 1e3
            t_sparse = bench_graph(lambda: sparse_decode(q, k, v, table, lens, scale, streaming_heads=stream, sink=128,
                                                   local=256, page_list=sel, page_list_len=sel_len,
                                                   max_seq_len=s, **kw)) * 1e3
            dense_bytes = 2 * b * s * HKV * D * elem
            sparse_bytes = 2 * b * (HKV // 2) * D * elem * (budget_pages * PAGE + 128 + 256)
            for name, t, by in (("SDPA dense", t_sdpa, dense_bytes), ("lserve dense", t_dense, dense_bytes),
                                ("lserve 50% streaming + 4096 budget", t_sparse, sparse_bytes)):
                rows.append(f"| {s // 1024}K | {b} | {name} | {t:.1f} | {by / t / 1e6:.2f} | {t_sdpa / t:.2f} |")
            del k, v, ks, vs
            torch.cuda.empty_cache()
    return rows


def staged_prefill(k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, scales: dict):
    """`sparse_prefill` over FP8 pages as the engine runs it: every page of row 0 dequantized into
    a bfloat16 copy first (page 0 of the copy zero), then the prefill kernel over the copy."""
    n = table.shape[1]
    pairs = torch.stack([torch.zeros(n, dtype=torch.int32), torch.arange(n, dtype=torch.int32),
                         torch.arange(1, n + 1, dtype=torch.int32)], 1).to(DEV)
    copy_table = torch.arange(1, n + 1, dtype=torch.int32, device=DEV)[None]
    k_copy = torch.zeros((n + 1, *k.shape[1:]), dtype=DT, device=DEV)
    v_copy = torch.zeros_like(k_copy)

    def run(q, _k, _v, _table, *args, **kw):
        dequantize_listed_pages(k, v, scales["k_scale"], scales["v_scale"], table, pairs, k_copy, v_copy)
        return sparse_prefill(q, k_copy, v_copy, copy_table, *args, **kw)

    return run


def sweep_prefill(s: int) -> dict:
    q = torch.randn((s, HQ, D), dtype=DT, device=DEV)
    k, v, table, scales = paged_cache(1, s)
    lens = torch.tensor([s], dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0, s], dtype=torch.int32, device=DEV)
    prefill = staged_prefill(k, v, table, scales) if scales else sparse_prefill
    best = None
    configs = [(128, 128, 8, 2, False), (128, 128, 8, 3, False)]
    configs += [(bm, 64, w, st, True) for bm in (64, 128) for w in (4, 8) for st in (2, 3, 4) if not (bm == 64 and w == 8)]
    for block_m, block_n, num_warps, num_stages, tma in configs:
        tiles = plan_tiles([s], block_m, DEV)
        try:
            t = bench(lambda: prefill(q, k, v, table, lens, qsl, tiles, D**-0.5, block_n=block_n,
                                      num_warps=num_warps, num_stages=num_stages, use_tma=tma), 10, 30)
        except Exception as exc:  # noqa: BLE001 (a config that does not fit is skipped)
            print(f"prefill block_m={block_m} block_n={block_n} warps={num_warps} stages={num_stages} tma={tma}: "
                  f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        print(f"prefill {s}: block_m={block_m} block_n={block_n} warps={num_warps} stages={num_stages} tma={tma}: "
              f"{t:.2f} ms ({causal_flops(s, HQ) / t / 1e9:.0f} TFLOP/s)", flush=True)
        if best is None or t < best[0]:
            best = (t, dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                            use_tma=tma))
    return best[1]


def sweep_decode(s: int, b: int) -> dict:
    q = torch.randn((b, HQ, D), dtype=DT, device=DEV)
    k, v, table, scales = paged_cache(b, s)
    lens = torch.full((b,), s, dtype=torch.int32, device=DEV)
    best = None
    for block_n in (64, 128, 256):
        for num_warps in (4, 8):
            for num_stages in (2, 3, 4):
                t = bench_graph(lambda: sparse_decode(q, k, v, table, lens, D**-0.5, max_seq_len=s, block_n=block_n,
                                                      num_warps=num_warps, num_stages=num_stages, **scales)) * 1e3
                tbs = 2 * b * s * HKV * D * kv_elem_bytes() / t / 1e6
                print(f"decode {s} b{b}: block_n={block_n} warps={num_warps} stages={num_stages}: {t:.1f} us "
                      f"({tbs:.2f} TB/s)", flush=True)
                if best is None or t < best[0]:
                    best = (t, dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages))
    return best[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", default="8192,32768,131072")
    ap.add_argument("--decode", default="32768,131072,262144")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--sweep", action="store_true", help="tune block sizes first")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                    help="lserve's kernels over bfloat16 (auto) or FP8 pages")
    args = ap.parse_args()
    global FP8
    FP8 = args.kv_cache_dtype == "fp8"
    torch.manual_seed(0)
    pcfg = dict(block_m=128, block_n=64, num_warps=4, num_stages=2, use_tma=True)
    dcfg = dict(block_n=128, num_warps=4, num_stages=3)
    if args.sweep:
        pcfg = sweep_prefill(32768)
        dcfg = sweep_decode(131072, 1)
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
          f"Hq={HQ} Hkv={HKV} D={D} KV {'fp8' if FP8 else 'bf16'} page={PAGE}; prefill {pcfg}; decode {dcfg}")
    print("\n| prefill | kernel | ms/layer | TFLOP/s | speedup vs SDPA |\n|---|---|---|---|---|")
    print("\n".join(prefill_rows([int(x) for x in args.prefill.split(",")], pcfg)), flush=True)
    print("\n| decode | batch | kernel | us/layer | TB/s read | speedup vs SDPA |\n|---|---|---|---|---|---|")
    print("\n".join(decode_rows([int(x) for x in args.decode.split(",")],
                                [int(x) for x in args.batches.split(",")], dcfg)))


if __name__ == "__main__":
    main()
