"""Programmatic dependent launch (PDL) for the small kernels of a decode step.

A decode step at long context with sparse attention is a chain of several hundred kernels of a
few microseconds each; between two of them the GPU drains one grid before it starts the next.
On Hopper (compute capability 9.0+) a kernel launched with PDL is scheduled while the kernel
before it is still running: it signals its own dependents at once (`griddepcontrol.launch_dependents`)
and then waits (`griddepcontrol.wait`) until every grid before it has finished and its writes are
visible, before it reads anything. The wait is the kernel's first statement, so the kernel's
results are the same with or without PDL; only its launch latency hides behind its predecessor.
Captured CUDA graphs keep the programmatic edges.

The small kernels of the decode step (norm, rotary, SiLU-and-mul, K/V append, merge, page
scores and top pages) take `PDL: tl.constexpr` and call `pdl_enter(PDL)` first; their wrappers
pass `**pdl_args(device)`. The attention decode kernel does not: launched with PDL, a long dense
decode grid made the whole step 0.5 ms slower at 256K on an H200, even with its trigger moved
behind its main loop (docs/benchmarks.md). `LSERVE_PDL=0` turns it off (for A/B timing); the CPU interpreter
and GPUs before Hopper never use it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Start of a kernel: let the next kernel launch, then wait for the ones before."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@functools.lru_cache(maxsize=None)
def _pdl_on(device_type: str, index: int | None) -> bool:
    if device_type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("LSERVE_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_args(device: torch.device) -> dict:
    """Launch keywords of a kernel on `device`: `PDL` (the kernel's constexpr) and Triton's
    `launch_pdl` where the GPU supports it."""
    if _pdl_on(device.type, device.index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
