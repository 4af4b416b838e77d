"""KV tensors and memory sizing.

Layout, per layer: K and V each `(num_pages, page_size, num_kv_heads, head_dim)` ("NHD" pages, as
vLLM). A page id indexes the same page in every layer, so one page table serves all layers. Slot
`page_id * page_size + offset` addresses one token's K/V in a layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lserve.errors import LServeError

DEFAULT_GPU_FRACTION = 0.9
DEFAULT_CPU_FRACTION = 0.5


@dataclass(frozen=True)
class KVShape:
    """What one pool's tensors look like."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        """K and V of one page over every layer."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem


class KVCacheTensors:
    """Per-layer K and V page tensors of one pool."""

    def __init__(self, shape: KVShape, num_pages: int, device: torch.device) -> None:
        self.shape = shape
        self.num_pages = num_pages
        dims = (num_pages, shape.page_size, shape.num_kv_heads, shape.head_dim)
        # torch.empty: pages are written before they are read; no need to touch the memory here.
        try:
            self.k = [torch.empty(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
            self.v = [torch.empty(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            raise LServeError(
                f"cannot allocate {num_pages} KV pages ({num_pages * shape.bytes_per_page / 2**30:.1f} GiB) "
                f"on {device}; lower num_kv_pages"
            ) from exc


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device: GPU free memory, or the OS's MemAvailable for the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def plan_num_pages(
    shape: KVShape,
    device: torch.device,
    *,
    num_kv_pages: int | None,
    memory_fraction: float | None,
    max_useful_pages: int,
) -> int:
    """Number of pages: the explicit override, else a share of free memory capped by what can be used.

    `max_useful_pages` is what `max_num_seqs` requests of `max_model_len` tokens could ever hold;
    reserving more would only take memory from the rest of the machine.
    """
    if num_kv_pages is not None:
        return num_kv_pages
    if memory_fraction is None:
        memory_fraction = DEFAULT_GPU_FRACTION if device.type == "cuda" else DEFAULT_CPU_FRACTION
    budget = int(available_memory_bytes(device) * memory_fraction)
    by_memory = budget // shape.bytes_per_page
    if by_memory < 1:
        raise LServeError(
            f"no memory left for the KV cache: {budget / 2**20:.0f} MiB available for pages of "
            f"{shape.bytes_per_page / 2**20:.1f} MiB; lower max_model_len or free memory"
        )
    return int(min(by_memory, max_useful_pages))
