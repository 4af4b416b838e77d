"""Programmatic dependent launch (PDL) for the small kernels of a decode step.

A decode step at long context with sparse attention is a chain of several hundred kernels of a
few microseconds each; between two of them the GPU drains one grid before it starts the next.
On Hopper (compute capability 9.0+) a kernel launched with PDL is scheduled while the kernel
before it is still running. Its first two statements let its own dependents launch
(`griddepcontrol.launch_dependents`) and then wait (`griddepcontrol.wait`) until the grid before
it has finished and its writes are visible (that grid waited for its own predecessor in turn);
nothing is read or written before the wait, so the kernel's results are the same with or
without PDL, and only its launch latency hides behind its predecessor. Captured CUDA graphs keep
the programmatic edges (they need a CUDA 12.3+ driver).

The small kernels of the decode step (norm, rotary, SiLU-and-mul, K/V append, merge, page
scores and top pages, the one-row GEMV) take `PDL: tl.constexpr` and call `pdl_enter(PDL)`
first; their wrappers pass `**pdl_args(device)`. The attention decode kernel does not: launched
with PDL, a long dense decode grid made the whole step slower at 256K on an H200, even with its
trigger moved behind its main loop; for short key ranges only (a ring, a page list) it changed
nothing at 256K batch 1 with steps launched ahead and made 64K batch 8 slower (docs/benchmarks.md).
`LSERVE_PDL=0`, set before the first kernel runs, turns it off (for A/B timing); the Triton
interpreter, ROCm and GPUs before Hopper never use it.
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


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _pdl_on(index: int) -> bool:
    if _interpreting() or torch.version.hip is not None or os.environ.get("LSERVE_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_args(device: torch.device) -> dict:
    """Launch keywords of a kernel on `device`: `PDL` (the kernel's constexpr) and Triton's
    `launch_pdl` where the GPU supports it."""
    if device.type == "cuda" and _pdl_on(device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
