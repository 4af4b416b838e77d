"""Decode-sized projections: `lserve.ops.gemv` against cuBLAS (`F.linear`) on Llama-3-8B's shapes.

    python benchmarks/gemv_decode.py [--rows 1,2,4,8] [--shapes q/k/v,output,down] [--fp8]

For each projection and batch, a CUDA graph runs 8 (norm, product) pairs over 8 distinct copies
of the weight (so that L2 holds none of them, as in a decode step, where each weight is read
once). The norm is the engine's RMSNorm kernel (launched with programmatic dependent launch on
Hopper), the projection's real predecessor, and is there for both sides: the time reported is
per pair minus the norm alone, in microseconds, with the bandwidth of the weight read. gate/up
includes SiLU-and-mul on both sides (cuBLAS then `silu_and_mul`, against the GEMV's `gated` form,
which fuses it). Each GEMV tiling (block_n, block_k, warps, stages) must match cuBLAS to bf16
rounding first; a tiling that fails to compile is reported, not fatal.

--fp8: the weights are E4M3 with a scale per output channel (`quantization="fp8"`). The GEMV
reads them and multiplies x as it is (W8A16), and must match that product; beside it the
multi-row path, `torch._scaled_mm` after the activation quantizer (`ops.fp8_linear.fp8_linear`),
and cuBLAS and the GEMV (default tiling) on the bfloat16 weights as the baselines. Bandwidths are
of the bytes each side reads (FP8: half).

--prefetch 0,1024,...: instead, one row only, the GEMV at 4 and at 8 columns a program (the other
tiling parameters at their defaults), with each `prefetch_k` (the first columns of each program's weight rows asked of L2
before the kernel waits for its predecessor; 0 = off) side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_kernels import bench_graph  # noqa: E402

from lserve.ops.fp8_linear import fp8_linear, quantize_weight  # noqa: E402
from lserve.ops.fused_layers import rms_norm, silu_and_mul  # noqa: E402
from lserve.ops.gemv import gemv  # noqa: E402

SHAPES = {  # name: (N, K) of Llama-3-8B
    "q/k/v": (6144, 4096),
    "output": (4096, 4096),
    "gate/up": (28672, 4096),  # with SiLU-and-mul: cuBLAS + silu_and_mul against gemv(gated=True)
    "down": (4096, 14336),
    "lm_head": (128256, 4096),  # bfloat16 in the engine (not quantized); not in the default --shapes
}
COPIES = 8


def tilings(rows: int, fp8: bool = False) -> list[tuple[int, int, int, int]]:
    """(block_n, block_k, warps, stages) worth trying for `rows` rows."""
    if rows == 1 and fp8:  # one-byte weights: wider K tiles for the same bytes in flight
        return [(bn, bk, w, st) for bn in (4, 8, 16) for bk in (1024, 2048) for w in (4, 8) for st in (3, 4)]
    if rows == 1:
        return ([(bn, bk, 4, st) for bn in (2, 4, 8, 16) for bk in (512, 1024) for st in (3, 4)]
                + [(4, 1024, 8, 3), (8, 1024, 8, 3), (4, 2048, 8, 3)])
    return [(bn, bk, w, st) for bn in (8, 16) for bk in (64, 128) for w in (4, 8) for st in (3,)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--shapes", default="q/k/v,output,gate/up,down", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--fp8", action="store_true", help="FP8 weights: the GEMV and torch._scaled_mm against "
                    "cuBLAS on bfloat16 weights")
    ap.add_argument("--prefetch", default=None, help="comma-separated prefetch_k values to compare "
                    "(one row; with --fp8 on FP8 weights)")
    ap.add_argument("--json", default=None, help="write every time to this file, and the one-row tiling with "
                    "the least total time over the shapes (but gate/up) as 'best_one_row'")
    args = ap.parse_args()
    dev = torch.device("cuda")
    record: dict = {}
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; {'FP8 weights, ' if args.fp8 else ''}"
          f"bf16 activations; {COPIES} distinct weights per graph, each product after an RMSNorm")
    if args.prefetch:
        prefetch_table(args, dev)
        return
    if args.fp8:
        fp8_table(args, dev)
        return
    print("\n| projection | rows | cuBLAS us (TB/s) | best GEMV us (TB/s) | its tiling (block_n, block_k, warps, "
          "stages) | others: us |")
    print("|---|---:|---:|---:|---|---|")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        ws = [torch.randn((n, k), dtype=torch.bfloat16, device=dev) / k**0.5 for _ in range(COPIES)]
        norm_w = torch.ones(k, dtype=torch.bfloat16, device=dev)
        nbytes = n * k * 2
        gated = name == "gate/up"

        def cublas(x: torch.Tensor, w: torch.Tensor, gated: bool = gated) -> torch.Tensor:
            return silu_and_mul(F.linear(x, w)) if gated else F.linear(x, w)

        for rows in (int(r) for r in args.rows.split(",")):
            h = torch.randn((rows, k), dtype=torch.bfloat16, device=dev)
            want = cublas(rms_norm(h, norm_w, 1e-5), ws[0]).float()
            t_norm = bench_graph(lambda: [rms_norm(h, norm_w, 1e-5) for _ in ws], calls=4) * 1e3 / COPIES
            t_cublas = bench_graph(lambda: [cublas(rms_norm(h, norm_w, 1e-5), w) for w in ws],
                                   calls=4) * 1e3 / COPIES - t_norm
            results, failed = [], []
            record[f"{name}/{rows}/cublas"] = t_cublas
            for bn, bk, warps, stages in tilings(rows):
                kw = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, gated=gated)
                try:
                    got = gemv(rms_norm(h, norm_w, 1e-5), ws[0], **kw).float()
                except Exception as e:  # noqa: BLE001 - a tiling that does not compile is a result
                    failed.append(f"{(bn, bk, warps, stages)}: {type(e).__name__}")
                    continue
                err = float((got - want).abs().max() / want.abs().max())
                assert err < 2e-2, f"{name} rows {rows} tiling {kw}: error {err}"
                t = bench_graph(lambda kw=kw: [gemv(rms_norm(h, norm_w, 1e-5), w, **kw) for w in ws],
                                calls=4) * 1e3 / COPIES - t_norm
                results.append(((bn, bk, warps, stages), t))
                record[f"{name}/{rows}/{bn},{bk},{warps},{stages}"] = t
            if not results:
                print(f"| {name} | {rows} | {t_cublas:.1f} | - | every tiling failed: {'; '.join(failed)} | |")
                continue
            best, t_best = min(results, key=lambda r: r[1])
            others = ", ".join(f"{'/'.join(str(v) for v in c)}: {t:.1f}" for c, t in results if c != best)
            if failed:
                others += f"; failed: {'; '.join(failed)}"
            print(f"| {name} | {rows} | {t_cublas:.1f} ({nbytes / t_cublas / 1e6:.2f}) | {t_best:.1f} "
                  f"({nbytes / t_best / 1e6:.2f}) | {best} | {others} |", flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    if args.json:
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for key, t in record.items():
            rows, tiling = key.split("/")[-2:]  # (names hold slashes: q/k/v)
            if rows == "1" and tiling != "cublas" and not key.startswith("gate/up"):
                totals[tiling] = totals.get(tiling, 0.0) + t
                counts[tiling] = counts.get(tiling, 0) + 1
        shapes = len([s for s in args.shapes.split(",") if s != "gate/up"])
        whole = {t: v for t, v in totals.items() if counts[t] == shapes}  # timed on every shape
        if whole:
            bn, bk, warps, stages = (int(v) for v in min(whole, key=whole.get).split(","))
            record["best_one_row"] = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        Path(args.json).write_text(json.dumps(record, indent=1))


def fp8_table(args: argparse.Namespace, dev: torch.device) -> None:
    print("\n| projection | rows | cuBLAS bf16 us (TB/s) | GEMV bf16 us (TB/s) | scaled_mm FP8 us (TB/s) | "
          "best FP8 GEMV us (TB/s) | its tiling | others: us |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        gated = name == "gate/up"
        ws = [torch.randn((n, k), dtype=torch.bfloat16, device=dev) / k**0.5 for _ in range(COPIES)]
        q8 = [quantize_weight(w) for w in ws]
        norm_w = torch.ones(k, dtype=torch.bfloat16, device=dev)

        def post(y: torch.Tensor) -> torch.Tensor:
            return silu_and_mul(y) if gated else y

        for rows in (int(r) for r in args.rows.split(",")):
            h = torch.randn((rows, k), dtype=torch.bfloat16, device=dev)
            x = rms_norm(h, norm_w, 1e-5)
            w8, s8 = q8[0]
            want = post((x.float() @ (w8.float() * s8[:, None]).T).to(x.dtype)).float()  # the GEMV's W8A16
            t_norm = bench_graph(lambda: [rms_norm(h, norm_w, 1e-5) for _ in ws], calls=4) * 1e3 / COPIES
            t_bf16 = bench_graph(lambda: [post(F.linear(rms_norm(h, norm_w, 1e-5), w)) for w in ws],
                                 calls=4) * 1e3 / COPIES - t_norm
            t_g16 = bench_graph(lambda: [gemv(rms_norm(h, norm_w, 1e-5), w, gated=gated) for w in ws],
                                calls=4) * 1e3 / COPIES - t_norm if rows == 1 else float("nan")
            t_mm = bench_graph(lambda: [post(fp8_linear(rms_norm(h, norm_w, 1e-5), w8, s8, None, torch.bfloat16))
                                        for w8, s8 in q8], calls=4) * 1e3 / COPIES - t_norm
            results, failed = [], []
            for bn, bk, warps, stages in tilings(rows, fp8=True):
                kw = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, gated=gated)
                try:
                    got = gemv(x, q8[0][0], weight_scale=q8[0][1], **kw).float()
                except Exception as e:  # noqa: BLE001 - a tiling that does not compile is a result
                    failed.append(f"{(bn, bk, warps, stages)}: {type(e).__name__}")
                    continue
                err = float((got - want).abs().max() / want.abs().max())
                assert err < 2e-2, f"{name} rows {rows} tiling {kw}: error {err}"
                t = bench_graph(lambda kw=kw: [gemv(rms_norm(h, norm_w, 1e-5), w8, weight_scale=s8, **kw)
                                               for w8, s8 in q8], calls=4) * 1e3 / COPIES - t_norm
                results.append(((bn, bk, warps, stages), t))
            best, t_best = min(results, key=lambda r: r[1]) if results else (None, float("nan"))
            others = ", ".join(f"{'/'.join(str(v) for v in c)}: {t:.1f}" for c, t in results if c != best)
            if failed:
                others += f"; failed: {'; '.join(failed)}"
            print(f"| {name} | {rows} | {t_bf16:.1f} ({2 * n * k / t_bf16 / 1e6:.2f}) | {t_g16:.1f} "
                  f"({2 * n * k / t_g16 / 1e6:.2f}) | {t_mm:.1f} "
                  f"({n * k / t_mm / 1e6:.2f}) | {t_best:.1f} ({n * k / t_best / 1e6:.2f}) | {best} | {others} |",
                  flush=True)
        ws.clear()
        q8.clear()
        torch.cuda.empty_cache()


def prefetch_table(args: argparse.Namespace, dev: torch.device) -> None:
    values = [int(v) for v in args.prefetch.split(",")]
    print(f"\n{'FP8' if args.fp8 else 'bf16'} weights, one row; us per product (TB/s) at each prefetch_k")
    print("\n| projection | block_n | " + " | ".join(f"prefetch {v}" for v in values) + " |")
    print("|---|---|" + "---:|" * len(values))
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        gated = name == "gate/up"
        ws = [torch.randn((n, k), dtype=torch.bfloat16, device=dev) / k**0.5 for _ in range(COPIES)]
        weights = [quantize_weight(w) for w in ws] if args.fp8 else [(w, None) for w in ws]
        del ws
        nbytes = n * k * weights[0][0].element_size()
        norm_w = torch.ones(k, dtype=torch.bfloat16, device=dev)
        h = torch.randn((1, k), dtype=torch.bfloat16, device=dev)
        x = rms_norm(h, norm_w, 1e-5)
        t_norm = bench_graph(lambda: [rms_norm(h, norm_w, 1e-5) for _ in weights], calls=4) * 1e3 / COPIES
        for block_n in (4, 8):
            want = gemv(x, weights[0][0], weight_scale=weights[0][1], gated=gated, block_n=block_n)
            cells = []
            for v in values:
                kw = dict(block_n=block_n, gated=gated, prefetch_k=v)
                got = gemv(x, weights[0][0], weight_scale=weights[0][1], **kw)
                assert torch.equal(got, want), f"{name} prefetch_k={v} changed the product"
                t = bench_graph(lambda kw=kw: [gemv(rms_norm(h, norm_w, 1e-5), w, weight_scale=s, **kw)
                                               for w, s in weights], calls=4) * 1e3 / COPIES - t_norm
                cells.append(f"{t:.1f} ({nbytes / t / 1e6:.2f})")
            print(f"| {name} | {block_n} columns | " + " | ".join(cells) + " |", flush=True)
        weights.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
