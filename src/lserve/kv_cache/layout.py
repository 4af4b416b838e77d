"""KV tensors and memory sizing.

Layout, per layer: K and V each `(num_pages, page_size, heads, head_dim)` ("NHD" pages, as vLLM).
A page id indexes the same page in every layer, so one page table serves all layers. Slot
`page_id * page_size + offset` addresses one token's K/V in a layer.

With streaming heads there are two pools (`KVCache`): the paged pool holds only each layer's dense
heads (so a page costs less and more context fits), and the ring pool holds the streaming heads:
a sequence holds ring pages only for its sink and its local window (`RingGeometry`), taken from
the pool's free list as the window moves and returned behind it (`kv_cache.ring_pages`), so its
share is constant in context length. The pools' head counts differ per layer, as the head
pattern decides.

A model with sliding-window layers (Gemma 3, Mistral, Qwen2 with `use_sliding_window`) keeps
those layers in a third pool, the window pool, kept like the ring pool (no sink, the window),
so that they too cost constant memory per sequence. The paged pool then holds the
full-attention layers only (zero heads elsewhere).

A ring or window pool's tensors hold two pages past those it hands out: a scratch page (the
padded rows of captured decode graphs write there) and a null page of zeros, which the page
tables name for the pages a sequence no longer holds (kernels that read a whole tile mask those
keys; zeros keep a masked key from turning the output into NaN).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lserve.errors import LServeError
from lserve.kv_cache.fp8 import FP8_DTYPE, SCALE_DTYPE, as_bytes, is_fp8

DEFAULT_GPU_FRACTION = 0.9
DEFAULT_CPU_FRACTION = 0.5
DEFAULT_CPU_KV_BYTES = 4 * 2**30
"""On a CPU the KV cache takes at most this by default (as vLLM's CPU backend's 4 GiB), not a
share of the machine's memory: a server keeps its footprint whatever the machine has free."""


@dataclass(frozen=True)
class KVShape:
    """What one pool's tensors look like."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    heads_per_layer: tuple[int, ...] | None = None
    """Heads this pool holds in each layer; None: `num_kv_heads` in every layer."""
    cache_dtype: torch.dtype | None = None
    """What K and V are stored in (None: `dtype`, the model's). FP8 (`kv_cache.fp8`) adds a
    float32 scale per token and head for each; page statistics stay in `dtype`, labels too unless
    they are FP8 themselves (`KVCacheTensors`)."""

    def layer_heads(self, layer: int) -> int:
        return self.num_kv_heads if self.heads_per_layer is None else self.heads_per_layer[layer]

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.cache_dtype if self.cache_dtype is not None else self.dtype

    @property
    def quantized(self) -> bool:
        """K and V stored in FP8 with per-token scales."""
        return is_fp8(self.kv_dtype)

    @property
    def bytes_per_page(self) -> int:
        """K and V of one page over every layer (their scales included)."""
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        per_head = self.head_dim * elem
        if self.quantized:
            per_head += torch.empty((), dtype=SCALE_DTYPE).element_size()
        heads = sum(self.layer_heads(i) for i in range(self.num_layers))
        return 2 * self.page_size * heads * per_head


def stats_bytes_per_page(
    shape: KVShape, logical_page_size: int | None, label_channels: int = 0, label_fp8: bool = False
) -> int:
    """What page selection keeps per page over every layer: key min and max of its logical pages
    (`logical_page_size`), or `label_channels` key channels per token (channel scores), FP8 ones
    with a float32 scale per token and head (`label_fp8`)."""
    elem = torch.empty((), dtype=shape.dtype).element_size()
    heads = sum(shape.layer_heads(i) for i in range(shape.num_layers))
    if label_channels:
        per_token = label_channels + SCALE_DTYPE.itemsize if label_fp8 else label_channels * elem
        return shape.page_size * heads * per_token
    if logical_page_size is None:
        return 0
    return 2 * (shape.page_size // logical_page_size) * heads * shape.head_dim * elem


class KVCacheTensors:
    """Per-layer K and V page tensors of one pool, and optionally what page selection scores:
    per-logical-page key statistics, or per-token key labels (a few channels of each key).

    Labels are `(heads, num_pages * page_size, r)` per layer, head-major so that a score kernel
    reads one head's labels contiguously; `label_channels[l]` (heads, r) int32 says which key
    channels of each of the pool's heads they are. With `label_fp8` they are E4M3 with a float32
    scale per token and head, `label_scale[l]` (heads, num_pages * page_size) (`kv_cache.fp8`'s
    format over the r channels: a label is `value * scale`); else in the model's dtype.

    An FP8 pool (`shape.quantized`) also has `k_scale`/`v_scale`: per layer
    `(num_pages, heads, page_size)` float32, the scale of each token's K (V) row per head (head-major
    within a page, so that a kernel reads one head's scales of a page as one contiguous run)."""

    def __init__(
        self, shape: KVShape, num_pages: int, device: torch.device, logical_page_size: int | None = None,
        label_channels: list[torch.Tensor] | None = None, label_fp8: bool = False,
    ) -> None:
        self.shape = shape
        self.num_pages = num_pages
        self.logical_page_size = logical_page_size
        self.k_min: list[torch.Tensor] | None = None
        self.k_max: list[torch.Tensor] | None = None
        self.k_label: list[torch.Tensor] | None = None
        self.label_channels: list[torch.Tensor] | None = None
        self.label_scale: list[torch.Tensor] | None = None
        self.k_scale: list[torch.Tensor] | None = None
        self.v_scale: list[torch.Tensor] | None = None
        # torch.empty: pages are written before they are read; no need to touch the memory here.
        try:
            dims = [(num_pages, shape.page_size, shape.layer_heads(i), shape.head_dim) for i in range(shape.num_layers)]
            self.k = [torch.empty(d, dtype=shape.kv_dtype, device=device) for d in dims]
            self.v = [torch.empty(d, dtype=shape.kv_dtype, device=device) for d in dims]
            if shape.quantized:
                sdims = [(n, heads, page) for n, page, heads, _ in dims]
                self.k_scale = [torch.empty(d, dtype=SCALE_DTYPE, device=device) for d in sdims]
                self.v_scale = [torch.empty(d, dtype=SCALE_DTYPE, device=device) for d in sdims]
            if label_channels is not None:
                self.label_channels = [c.to(device=device, dtype=torch.int32).contiguous() for c in label_channels]
                slots = num_pages * shape.page_size
                label_dtype = FP8_DTYPE if label_fp8 else shape.dtype
                self.k_label = [torch.zeros((c.shape[0], slots, c.shape[1]), dtype=label_dtype, device=device)
                                for c in self.label_channels]
                if label_fp8:
                    self.label_scale = [torch.zeros((c.shape[0], slots), dtype=SCALE_DTYPE, device=device)
                                        for c in self.label_channels]
            elif logical_page_size is not None:
                rows = num_pages * shape.page_size // logical_page_size
                sdims = [(rows, shape.layer_heads(i), shape.head_dim) for i in range(shape.num_layers)]
                self.k_min = [torch.zeros(d, dtype=shape.dtype, device=device) for d in sdims]
                self.k_max = [torch.zeros(d, dtype=shape.dtype, device=device) for d in sdims]
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            raise LServeError(
                f"cannot allocate {num_pages} KV pages ({num_pages * shape.bytes_per_page / 2**30:.1f} GiB) "
                f"on {device}; lower num_kv_pages"
            ) from exc

    def zero_pages(self, pages: list[int]) -> None:
        """Fill these pages' K, V and FP8 scales with zeros in every layer."""
        index = torch.tensor(pages, dtype=torch.long, device=self.k[0].device)
        for tensors in (self.k, self.v, self.k_scale or [], self.v_scale or []):
            for t in tensors:
                as_bytes(t).index_fill_(0, index, 0)

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy pages `src` onto pages `dst` in every layer, with their FP8 scales and what page
        selection keeps of them (their logical pages' key statistics, or their slots' key labels)."""
        if not src:
            return
        device = self.k[0].device
        s = torch.tensor(src, dtype=torch.long, device=device)
        d = torch.tensor(dst, dtype=torch.long, device=device)
        for tensors in (self.k, self.v, self.k_scale or [], self.v_scale or []):
            for t in tensors:
                raw = as_bytes(t)
                raw.index_copy_(0, d, raw.index_select(0, s))

        def rows(pages: torch.Tensor, per_page: int) -> torch.Tensor:
            """The rows of these pages in a tensor with `per_page` rows per page."""
            return (pages[:, None] * per_page + torch.arange(per_page, device=device)).reshape(-1)

        if self.k_min is not None and self.k_max is not None and self.logical_page_size is not None:
            sub = self.shape.page_size // self.logical_page_size
            for t in (*self.k_min, *self.k_max):
                t.index_copy_(0, rows(d, sub), t.index_select(0, rows(s, sub)))
        if self.k_label is not None:
            for t in (*self.k_label, *(self.label_scale or [])):
                raw = as_bytes(t)
                raw.index_copy_(1, rows(d, self.shape.page_size), raw.index_select(1, rows(s, self.shape.page_size)))


@dataclass(frozen=True)
class RingGeometry:
    """Which pages of a sequence a pool of windowed heads keeps: streaming heads read the sink
    tokens and a local window (a wider one in prefill rows than in decode rows), sliding-window
    layers a window (no sink). Every other page of the sequence is dead for them. The pool's
    pages are taken on demand from a free list (`kv_cache.ring_pages.RingPages`), so it holds only
    live pages: per running sequence its sink and window pages, plus the pages of the step's
    prefill chunks."""

    page_size: int
    sink_tokens: int
    local_tokens: int
    """The window of decode rows (one new token)."""
    prefill_local_tokens: int
    """The window of prefill rows."""

    def _window(self, prefill: bool) -> int:
        # a sequence still in its prefill keeps the decode window too (its decode rows come later)
        return max(self.prefill_local_tokens, self.local_tokens) if prefill else self.local_tokens

    @property
    def sink_pages(self) -> int:
        return -(-self.sink_tokens // self.page_size)

    def pages_between_steps(self, prefill: bool) -> int:
        """The most pages a sequence holds between steps when its next row is a prefill row (or a
        decode row): its sink pages and the pages its window touches (one more than the window
        fills when it does not start on a page boundary)."""
        return self.sink_pages + -(-self._window(prefill) // self.page_size) + 1

    @property
    def pages_per_seq(self) -> int:
        """The most pages a decoding sequence holds."""
        return self.pages_between_steps(prefill=False)

    def live_pages(self, first_pos: int, seq_len: int, prefill: bool) -> tuple[int, int, int]:
        """(sink end, lo, hi): the logical pages a prefill (or decode) row reads and writes when
        its first new token is at `first_pos` and the sequence has `seq_len` tokens after it:
        pages 0 .. sink end - 1 and lo .. hi - 1 (from its first query's window to its last token)."""
        hi = -(-seq_len // self.page_size)
        sink_end = min(self.sink_pages, hi)
        lo = max(max(first_pos - self._window(prefill) + 1, 0) // self.page_size, sink_end)
        return sink_end, min(lo, hi), hi

    def pool_pages(self, num_seqs: int, step_tokens: int, max_model_len: int) -> int:
        """Pages a pool needs at most for `num_seqs` running sequences and steps of at most
        `step_tokens` new tokens, when at most one sequence is prefilled across steps or is a
        computed prefix waiting for its forks (the scheduler's rule): each sequence holds at most
        `pages_per_seq` between steps, that one sequence its prefill window, and a step's chunks
        (they add up to `step_tokens`) the pages they write; forked sequences share their prefix's
        full pages. Never more than the sequences' whole contexts."""
        whole = -(-max_model_len // self.page_size)
        need = num_seqs * self.pages_per_seq + self.pages_between_steps(prefill=True) + -(-step_tokens // self.page_size)
        return min(need, num_seqs * whole)


def dense_head_ids(streaming_flags: tuple[torch.Tensor, ...]) -> list[list[int]]:
    """Per layer, the KV heads that do not stream, in order: the heads of the paged pool."""
    return [[h for h, s in enumerate(f.tolist()) if not s] for f in streaming_flags]


class KVCache:
    """The engine's KV memory: the paged pool and, with streaming heads, the ring pool.

    `dense_heads[l]` / `streaming_heads[l]` are the KV head ids (of the model's layer l) that each
    pool holds, in order; a pool tensor's head h is the model's head `..._heads[l][h]`. Without a
    ring pool every head is in the paged pool (streaming heads then keep their whole history).
    """

    def __init__(
        self,
        paged: KVCacheTensors,
        ring: KVCacheTensors | None = None,
        streaming_flags: tuple[torch.Tensor, ...] | None = None,
        ring_geometry: RingGeometry | None = None,
        window: KVCacheTensors | None = None,
        window_geometry: RingGeometry | None = None,
        layer_windows: tuple[int | None, ...] | None = None,
    ) -> None:
        self.paged = paged
        self.ring = ring
        """The streaming heads' pool, or None."""
        self.ring_geometry = ring_geometry
        self.window = window
        """The sliding-window layers' pool (every head of such a layer), or None."""
        self.window_geometry = window_geometry
        self.shape = paged.shape
        n = paged.shape.num_layers
        self.layer_windows: tuple[int | None, ...] = layer_windows if layer_windows is not None else (None,) * n
        """Per layer, its sliding window (None: full attention); such a layer lives in the window
        pool when there is one, else in the paged pool."""
        assert window is None or (window_geometry is not None and layer_windows is not None)
        if ring is None:
            self.dense_heads: list[list[int]] = [list(range(paged.shape.layer_heads(i))) for i in range(n)]
            self.streaming_heads: list[list[int]] = [[] for _ in range(n)]
        else:
            assert streaming_flags is not None and ring_geometry is not None
            flags = [f.tolist() for f in streaming_flags]
            self.dense_heads = dense_head_ids(streaming_flags)
            self.streaming_heads = [[h for h, s in enumerate(f) if s] for f in flags]
        for layer, w in enumerate(self.layer_windows):
            if w is not None and window is not None:
                self.dense_heads[layer], self.streaming_heads[layer] = [], []

    def seat_pools(self) -> dict[str, tuple[KVCacheTensors, RingGeometry]]:
        """The pools whose pages a sequence holds only while they are in its windows ("ring",
        "window"), that this cache has."""
        pools = {"ring": (self.ring, self.ring_geometry), "window": (self.window, self.window_geometry)}
        return {name: (pool, geometry) for name, (pool, geometry) in pools.items()
                if pool is not None and geometry is not None}

    def ring_bytes_per_sequence(self) -> int:
        """The most one decoding sequence holds in the ring and window pools (constant in its length)."""
        return sum(geometry.pages_per_seq * pool.shape.bytes_per_page for pool, geometry in self.seat_pools().values())

    @property
    def k(self) -> list[torch.Tensor]:
        return self.paged.k

    @property
    def v(self) -> list[torch.Tensor]:
        return self.paged.v


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


def memory_budget_bytes(device: torch.device, memory_fraction: float | None, memory_bytes: int | None = None) -> int:
    """What the KV cache may take: `memory_bytes` if set, else a share of free memory (on a CPU
    by default no more than `DEFAULT_CPU_KV_BYTES`)."""
    if memory_bytes is not None:
        return memory_bytes
    if memory_fraction is not None:
        return int(available_memory_bytes(device) * memory_fraction)
    if device.type == "cuda":
        return int(available_memory_bytes(device) * DEFAULT_GPU_FRACTION)
    return min(DEFAULT_CPU_KV_BYTES, int(available_memory_bytes(device) * DEFAULT_CPU_FRACTION))


def plan_num_pages(
    shape: KVShape,
    device: torch.device,
    *,
    num_kv_pages: int | None,
    memory_fraction: float | None,
    max_useful_pages: int,
    memory_bytes: int | None = None,
    reserved_bytes: int = 0,
    extra_bytes_per_page: int = 0,
) -> int:
    """Number of pages: the explicit override, else a share of free memory capped by what can be used.

    `max_useful_pages` is what `max_num_seqs` requests of `max_model_len` tokens could ever hold;
    reserving more would only take memory from the rest of the machine. `reserved_bytes` (the
    ring pool) comes out of the share first; `extra_bytes_per_page` is per-page metadata (key
    statistics for page selection).
    """
    if num_kv_pages is not None:
        return num_kv_pages
    budget = memory_budget_bytes(device, memory_fraction, memory_bytes) - reserved_bytes
    per_page = shape.bytes_per_page + extra_bytes_per_page
    if per_page == 0:  # every head streams: pages only carry the page tables' bookkeeping
        return max_useful_pages
    by_memory = max(budget, 0) // per_page
    if by_memory < 1:
        raise LServeError(
            f"no memory left for the KV cache: {budget / 2**20:.0f} MiB available for pages of "
            f"{shape.bytes_per_page / 2**20:.1f} MiB; lower max_model_len or free memory"
        )
    return int(min(by_memory, max_useful_pages))
