"""Probes behind the decode-step choices of docs/benchmarks.md, timed in CUDA graphs (GPU only):

    python benchmarks/probe_gemm_pdl.py [pdl] [gemm] [l2]

- pdl: chains of small Triton kernels with and without programmatic dependent launch, alone and
  after cuBLAS GEMMs;
- gemm: the Llama-3-8B projections at decode batch sizes through cuBLAS and cuBLASLt, with the
  weight as (N, K) (`F.linear`) and as (K, N), distinct weights per call so L2 holds none;
- l2: the output projection after a spin that stands for attention, with and without a
  side-stream kernel that first reads its weight into L2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_kernels import bench_graph  # noqa: E402

DEV = torch.device("cuda")
DT = torch.bfloat16
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}


def gemms() -> None:
    for m in (1, 8):
        for name, (k, n) in SHAPES.items():
            x = torch.randn((m, k), dtype=DT, device=DEV)
            gb = n * k * 2 / 1e9
            # distinct weights, cycled, so that the 50 MB L2 cache holds none of them between calls
            copies = max(2, -(-200 // int(gb * 1e3)))
            ws = [torch.randn((n, k), dtype=DT, device=DEV) for _ in range(copies)]  # F.linear layout
            wts = [w.t().contiguous() for w in ws]  # (k, n): x @ wt
            turn = iter(range(10**9))
            row = [f"M={m} {name:8s} {gb * 1e3:6.1f} MB"]
            for label, fn in (("linear", lambda: F.linear(x, ws[next(turn) % copies])),
                              ("x@Wt(kn)", lambda: x @ wts[next(turn) % copies])):
                for lib in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(lib)
                    t = bench_graph(fn)
                    row.append(f"{label}/{lib} {t * 1e3:7.1f}us {gb / t:5.2f}TB/s")
            torch.backends.cuda.preferred_blas_library("cublas")
            print(" | ".join(row), flush=True)



@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(y_ptr + offs, x * 1.0001, mask=offs < n)


def pdl_chain() -> None:
    for n in (4096, 4096 * 8):
        a = torch.randn(n, device=DEV)
        b = torch.empty_like(a)
        for pdl in (False, True):
            def chain(pdl=pdl):
                for i in range(64):
                    src, dst = (a, b) if i % 2 == 0 else (b, a)
                    _scale_kernel[(triton.cdiv(n, 1024),)](src, dst, n, BLOCK=1024, PDL=pdl, launch_pdl=pdl)
            t = bench_graph(chain)
            print(f"chain of 64 kernels, {n} floats, pdl={pdl}: {t * 1e3:.1f} us ({t * 1e3 / 64:.2f} us per kernel)")
        # the chain with a cuBLAS GEMM between each pair (the engine's pattern)
        x = torch.randn((1, 4096), dtype=DT, device=DEV)
        w = torch.randn((4096, 4096), dtype=DT, device=DEV)
        for pdl in (False, True):
            def mixed(pdl=pdl):
                for i in range(32):
                    F.linear(x, w)
                    _scale_kernel[(triton.cdiv(n, 1024),)](a, b, n, BLOCK=1024, PDL=pdl, launch_pdl=pdl)
            t = bench_graph(mixed)
            print(f"32 x (GEMM 4096^2 + small kernel), {n} floats, pdl={pdl}: {t * 1e3:.1f} us")




@triton.jit
def _prefetch_kernel(w_ptr, sink_ptr, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * CHUNK, tl.minimum(pid * CHUNK + CHUNK, n), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last").to(tl.float32)
    tl.store(sink_ptr + pid, tl.sum(acc, axis=0))


def prefetch(w: torch.Tensor, sink: torch.Tensor, programs: int = 264) -> None:
    n = w.numel()
    chunk = triton.cdiv(triton.cdiv(n, programs), 4096) * 4096
    _prefetch_kernel[(triton.cdiv(n, chunk),)](w, sink, n, CHUNK=chunk, BLOCK=4096, num_warps=8)


def l2_prefetch() -> None:
    k, n = SHAPES["o"]
    copies = 8
    ws = [torch.randn((n, k), dtype=DT, device=DEV) for _ in range(copies)]
    x = torch.randn((1, k), dtype=DT, device=DEV)
    sink = torch.empty(4096, device=DEV)
    side = torch.cuda.Stream()
    turn = iter(range(10**9))
    t_pf = bench_graph(lambda: prefetch(ws[next(turn) % copies], sink))
    print(f"prefetch kernel alone, {n * k * 2 / 1e6:.1f} MB: {t_pf * 1e3:.1f} us")
    for cycles in (0, 20000, 40000):
        for pf in (False, True):
            def step(pf=pf, cycles=cycles):
                w = ws[next(turn) % copies]
                main = torch.cuda.current_stream()
                if pf:
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        prefetch(w, sink)
                if cycles:
                    torch.cuda._sleep(cycles)  # stands for the attention kernels
                if pf:
                    main.wait_stream(side)
                F.linear(x, w)
            t = bench_graph(step)
            print(f"o GEMM after {cycles} spin cycles, prefetch={pf}: {t * 1e3:.1f} us")
    # how long do the spins take alone
    for cycles in (20000, 40000):
        t = bench_graph(lambda c=cycles: torch.cuda._sleep(c))
        print(f"spin {cycles} cycles alone: {t * 1e3:.1f} us")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    parts = sys.argv[1:] or ["pdl", "gemm", "l2"]
    for part, fn in (("pdl", pdl_chain), ("gemm", gemms), ("l2", l2_prefetch)):
        if part in parts:
            fn()
