"""The attention backend interface and the registry of backends.

A backend is built once per engine around the KV cache. Per layer it writes the step's K/V and
attends, pool by pool: the paged pool holds the dense heads (or every head when there is no ring
pool), the ring pool the streaming heads, the window pool every head of a sliding-window layer
(attention with that window and no sink). Subclasses provide the three primitives (`_write`,
`_decode`, `_prefill`) over one pool; this class routes heads to pools, applies the windows of
streaming heads and the page lists of the page selector, and counts the pages decode reads.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from lserve.attention.metadata import AttentionMetadata
from lserve.attention.page_selector import PageSelector, cdiv
from lserve.attention.sparsity import HeadSparsity
from lserve.errors import NotSupportedError
from lserve.kv_cache.layout import KVCache, KVCacheTensors
from lserve.ops.paged_inputs import StoredSelection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolCall:
    """One pool's part of a layer: its tensors, tables and head routing."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_min: torch.Tensor | None
    k_max: torch.Tensor | None
    """Per-logical-page key statistics (statistics scores), or None."""
    page_table: torch.Tensor
    slot_mapping: torch.Tensor
    kv_heads: torch.Tensor | None
    """The model's KV heads in this pool, in pool order; None: all of them, in order."""
    q_heads: torch.Tensor | None
    streaming: torch.Tensor | None
    """(pool heads,) bool: heads that apply the Λ windows (None: none)."""
    ring: bool = False
    """The ring pool (streaming heads only: no page lists, no statistics)."""
    k_label: torch.Tensor | None = None
    """Per-token key labels (channel scores), or None."""
    label_channels: torch.Tensor | None = None
    """(pool heads, r) int32: which key channels the labels are."""
    label_scale: torch.Tensor | None = None
    """FP8 labels' per-token scales (pool heads, slots) float32; None: labels in the model's dtype."""
    window: tuple[int, int] | None = None
    """(sink, local) of a sliding-window layer (the same in prefill and decode); None: the
    streaming heads' windows apply."""
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    """An FP8 pool's per-token scales (num_pages, pool heads, page_size) float32; None: K and V
    are stored in the model's dtype."""

    @property
    def scores_pages(self) -> bool:
        """Whether this pool keeps what a page score reads (statistics or labels)."""
        return (self.k_min is not None and self.k_max is not None) or self.k_label is not None


@dataclass(frozen=True)
class StepPageCounts:
    """KV pages the step's decode rows read, and what dense attention would read (per row).

    With a top-p page budget the number of stored pages each selection reads is known on the
    device only: `stored` holds it (copied to the host without waiting), and `resolved()` adds
    it to `read` once the step has run."""

    read: tuple[int, ...]
    dense: tuple[int, ...]
    stored: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
    """(per-row stored pages on the host, or still on the device; the event after its copy)."""

    def resolved(self) -> StepPageCounts:
        """These counts with the stored pages added (waits for the step's copy of them)."""
        if self.stored is None:
            return self
        values, ready = self.stored
        if ready is not None:
            ready.synchronize()
        extra = values.tolist()
        return StepPageCounts(tuple(r + int(e) for r, e in zip(self.read, extra)), self.dense)


class AttentionBackend(ABC):
    """Writes the new tokens' K/V into the KV cache and attends over it.

    A backend is built once per engine around the KV cache. Each step follows one protocol, a
    plan-once / run-per-layer pair and a closing call:

    1. **plan once** (`prepare(md)`, host work, before the model runs): the page selector decides
       per decoding row whether it re-selects, and writes its plan (`ops.paged_inputs.PlanRow`)
       into its fixed device buffer; the decode page counts of the step are counted; the Triton
       backend plans its prefill tiles. Nothing here waits for the device.
    2. **run per layer** (`forward(q, k, v, layer, md)`, every layer in order; layer 0 also resets
       the tensors the layers of one forward share): write the step's K/V, score and store
       selections in "select" mode, attend.
    3. **close** (`collect_stored_pages(md)`, after the forward is queued): a top-p selection's
       page counts, known on the device only, are copied back without waiting.

    What a captured decode graph (`runner.cuda_graphs`) may rely on: the graph replays step 2
    only. Everything it reads must be a device buffer that step 1 or the graph's own input
    copies refill in place (the metadata buffers, the selector's plan and store, the head maps)
    plus what is fixed at capture: the batch bucket, the selector mode the graph was captured for
    (one graph per mode), `decode_split_len` (so eager steps and graphs split alike) and the
    pool routing. Host values that change per step (sequence lengths on the host, the mode) may
    steer only step 1 and the choice of graph, never the replayed work.
    """

    name: str = ""
    decode_split_len: int | None = None
    """Length a backend with split-K decode chooses its split count for (None: the step's longest
    sequence). The engine sets max_model_len, so eager steps and captured graphs split, and so
    round, identically."""

    def __init__(
        self,
        kv: KVCache | KVCacheTensors,
        num_heads: int,
        scale: float,
        sparsity: HeadSparsity | None = None,
        selector: PageSelector | None = None,
    ) -> None:
        self.cache = kv if isinstance(kv, KVCache) else KVCache(kv)
        self.kv = self.cache.paged
        self.num_heads = num_heads
        self.scale = scale
        self.sparsity = sparsity
        self.selector = selector
        self.last_page_counts = StepPageCounts((), ())
        shape = self.cache.shape
        self.num_kv_heads = shape.num_kv_heads
        self._group = num_heads // self.num_kv_heads
        device = self.kv.k[0].device
        self._streaming = [sparsity.layer(i) if sparsity else None for i in range(shape.num_layers)]
        self._routes: list[tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, torch.Tensor] | None]] = []
        for layer in range(shape.num_layers):
            dense, stream = self.cache.dense_heads[layer], self.cache.streaming_heads[layer]
            self._routes.append((
                self._head_index(dense, device) if stream and dense else None,
                self._head_index(stream, device) if stream else None,
            ))
        self._num_streaming = [int(f.sum()) if f is not None else 0 for f in self._streaming]
        # int8: the kernels' flag type (a bool tensor would be converted on every call)
        self._ring_flags = [
            torch.ones(len(h), dtype=torch.int8, device=device) for h in self.cache.streaming_heads
        ]
        self._window_flags = torch.ones(self.num_kv_heads, dtype=torch.int8, device=device)

    def _head_index(self, kv_heads: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        kv = torch.tensor(kv_heads, dtype=torch.long, device=device)
        q = (kv[:, None] * self._group + torch.arange(self._group, device=device)[None, :]).reshape(-1)
        return kv, q

    # ---- per step --------------------------------------------------------------------------

    def prepare(self, md: AttentionMetadata) -> None:
        """Per-step planning shared by every layer (called once per step, before the model runs)."""
        if self.selector is not None:
            self.selector.prepare(md)
        self.last_page_counts = self._count_pages(md)

    def prepare_for_capture(self, md: AttentionMetadata, mode: str) -> None:
        """Step 1 for a start-up graph capture: `md`'s rows are inert (the graph buffers' scratch
        rows) and the page selector takes `mode`'s path."""
        if self.selector is not None:
            self.selector.inert_plan(md.num_decodes, mode)
        self.last_page_counts = StepPageCounts((), ())

    def collect_stored_pages(self, md: AttentionMetadata) -> None:
        """After the step's forward is queued: attach the pages a top-p selection stored (known
        on the device only) to `last_page_counts`, copied to the host without waiting."""
        if self.selector is None or not md.num_decodes:
            return
        stored = self.selector.stored_pages(md.num_decodes)
        if stored is None:
            return
        ready = None
        if stored.is_cuda:
            host = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True)
            host.copy_(stored, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            stored = host
        counts = self.last_page_counts
        self.last_page_counts = StepPageCounts(counts.read, counts.dense, (stored, ready))

    def _count_pages(self, md: AttentionMetadata) -> StepPageCounts:
        nd = md.num_decodes
        if nd == 0:
            return StepPageCounts((), ())
        page = md.page_size
        sp = self.sparsity
        read, dense = [], []
        selector = self.selector if self.selector is not None and self.selector.plan is not None else None
        # head counts summed over layers: streaming heads, dense heads in selecting / other layers,
        # and the heads of sliding-window layers by window
        n_stream = n_dense_sel = n_dense_all = 0
        windowed: dict[int, int] = {}
        for layer, stream in enumerate(self._num_streaming):
            w = self.cache.layer_windows[layer]
            if w is not None:
                windowed[w] = windowed.get(w, 0) + self.num_kv_heads
                continue
            n_stream += stream
            if selector is not None and selector.layer_selects(layer):
                n_dense_sel += self.num_kv_heads - stream
            else:
                n_dense_all += self.num_kv_heads - stream
        for row in range(nd):
            length = md.seq_lens_cpu[row]
            n = cdiv(length, page)
            window = n
            if sp is not None:
                sink_pages = cdiv(min(sp.decode_sink, length), page)
                first_local = max(length - sp.decode_local, 0) // page
                window = n if first_local <= sink_pages else sink_pages + n - first_local
            listed = selector.pages_read(row) if selector is not None and n_dense_sel else n
            slid = sum(heads * min(n, cdiv(w, page) + 1) for w, heads in windowed.items())
            read.append(n_dense_sel * listed + n_dense_all * n + n_stream * window + slid)
            dense.append(n * self.num_kv_heads * len(self._streaming))
        return StepPageCounts(tuple(read), tuple(dense))

    # ---- per layer -------------------------------------------------------------------------

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, md: AttentionMetadata
    ) -> torch.Tensor:
        """q (T, Hq, D), k and v (T, Hkv, D) of this step's tokens -> output (T, Hq, D)."""
        if layer_idx == 0:
            self._begin_forward()
        if self.cache.layer_windows[layer_idx] is not None:
            return self._attend(self._window_call(layer_idx, md), q, k, v, layer_idx, md)
        return self._full_layer(q, k, v, layer_idx, md)

    def _full_layer(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, md: AttentionMetadata
    ) -> torch.Tensor:
        """A full-attention layer: its dense heads in the paged pool, its streaming heads in the ring."""
        paged = self.cache.paged
        k_min = paged.k_min[layer_idx] if paged.k_min is not None else None
        k_max = paged.k_max[layer_idx] if paged.k_max is not None else None
        labels = dict(k_label=paged.k_label[layer_idx], label_channels=paged.label_channels[layer_idx],
                      label_scale=paged.label_scale[layer_idx] if paged.label_scale is not None else None) \
            if paged.k_label is not None and paged.label_channels is not None else {}
        labels.update(_scales(paged, layer_idx))
        dense_route, stream_route = self._routes[layer_idx]
        if self.cache.ring is None or stream_route is None:  # one pool holds every head of this layer
            call = PoolCall(paged.k[layer_idx], paged.v[layer_idx], k_min, k_max, md.page_table, md.slot_mapping,
                            None, None, self._streaming[layer_idx], **labels)
            return self._attend(call, q, k, v, layer_idx, md)
        out = torch.empty_like(q)
        ring = self.cache.ring
        assert md.ring_page_table is not None and md.ring_slot_mapping is not None, "the step has no ring tables"
        calls = [PoolCall(ring.k[layer_idx], ring.v[layer_idx], None, None, md.ring_page_table,
                          md.ring_slot_mapping, stream_route[0], stream_route[1], self._ring_flags[layer_idx],
                          ring=True, **_scales(ring, layer_idx))]
        if dense_route is not None:
            calls.append(PoolCall(paged.k[layer_idx], paged.v[layer_idx], k_min, k_max, md.page_table,
                                  md.slot_mapping, dense_route[0], dense_route[1], None, **labels))
        self._attend_pools(calls, q, k, v, layer_idx, md, out)
        return out

    def _window_call(self, layer: int, md: AttentionMetadata) -> PoolCall:
        """A sliding-window layer: every head windowed without a sink, in the window pool (or in
        the paged pool, with `window_pool` off)."""
        pool, w = self.cache.window, self.cache.layer_windows[layer]
        assert w is not None
        if pool is None:
            paged = self.cache.paged
            return PoolCall(paged.k[layer], paged.v[layer], None, None, md.page_table, md.slot_mapping, None, None,
                            self._window_flags, window=(0, w), **_scales(paged, layer))
        assert md.window_page_table is not None and md.window_slot_mapping is not None, "the step has no window tables"
        return PoolCall(pool.k[layer], pool.v[layer], None, None, md.window_page_table, md.window_slot_mapping,
                        None, None, self._window_flags, ring=True, window=(0, w), **_scales(pool, layer))

    def _attend_pools(
        self, calls: list[PoolCall], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
        md: AttentionMetadata, out: torch.Tensor,
    ) -> None:
        """The pools of a layer whose heads are split between them, one after the other."""
        for call in calls:
            self._attend_heads(call, q, k, v, layer, md, out)

    def _attend_heads(
        self, call: PoolCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, md: AttentionMetadata,
        out: torch.Tensor,
    ) -> None:
        """One pool of several: attention of its heads (q, k, v hold all of the model's heads),
        written into their rows of `out`. This version gathers the heads and scatters the result;
        a backend whose kernels index heads through `call.kv_heads` does without the copies."""
        assert call.kv_heads is not None and call.q_heads is not None
        out[:, call.q_heads] = self._attend(call, q[:, call.q_heads], k[:, call.kv_heads], v[:, call.kv_heads], layer, md)

    def _begin_forward(self) -> None:
        """Drop tensors shared by the layers of the previous forward (a captured graph must build its own)."""
        if self.selector is not None:
            self.selector.begin_forward()

    def _attend(
        self, call: PoolCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, md: AttentionMetadata
    ) -> torch.Tensor:
        self._write(call, k, v, md)  # views into the qkv projection: the writers take strides
        out = torch.empty_like(q)
        nd = md.num_decodes
        if nd:
            lists = self._page_lists(call, q[:nd], layer, md)
            out[:nd] = self._decode(call, q[:nd], md, lists)
        if md.num_prefills:
            self._prefill(call, q, k, v, md, out)
        return out

    def _page_lists(
        self, call: PoolCall, q: torch.Tensor, layer: int, md: AttentionMetadata, all_heads: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | StoredSelection | None:
        """Decode page lists of this pool's heads: explicit ones in the metadata, else the selector's.
        `all_heads`: q holds every query head of the model, not only the pool's."""
        if call.ring or call.window is not None:
            return None  # streaming heads and sliding-window layers read their windows
        if md.decode_page_list is not None and md.decode_page_list_len is not None:
            if call.kv_heads is None:
                return md.decode_page_list, md.decode_page_list_len
            return md.decode_page_list[:, call.kv_heads].contiguous(), md.decode_page_list_len[:, call.kv_heads].contiguous()
        if self.selector is None or not call.scores_pages:
            return None
        nd = md.num_decodes

        def scores() -> torch.Tensor:
            heads = call.kv_heads if all_heads else None  # q holds every head: reach the pool's by map
            return self._page_scores(call, q, md.page_table[:nd], md.seq_lens[:nd], md.page_size, heads)

        return self._selection(layer, nd, scores)

    def _selection(self, layer: int, nd: int, scores_fn) -> tuple[torch.Tensor, torch.Tensor] | StoredSelection | None:
        """The selector's pages for this layer's decode rows: explicit lists here; a backend whose
        decode kernel reads the selector's store directly returns the `StoredSelection`."""
        assert self.selector is not None
        return self.selector.select(layer, nd, scores_fn)

    # ---- what a backend implements ---------------------------------------------------------

    @abstractmethod
    def _write(self, call: PoolCall, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata) -> None:
        """Scatter the step's k, v (T, pool heads, D) into the pool (and update its key statistics)."""

    @abstractmethod
    def _decode(
        self, call: PoolCall, q: torch.Tensor, md: AttentionMetadata,
        lists: tuple[torch.Tensor, torch.Tensor] | StoredSelection | None,
    ) -> torch.Tensor:
        """Attention of the decode rows' queries (nd, pool q heads, D) over the pool (`lists`: what
        `_page_lists` gave: a `StoredSelection` only where this backend's `_selection` makes one)."""

    @abstractmethod
    def _prefill(
        self, call: PoolCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
        out: torch.Tensor,
    ) -> None:
        """Attention of the prefill rows (after the decode rows in q) into `out`'s prefill rows."""

    @abstractmethod
    def _page_scores(
        self, call: PoolCall, q: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
        kv_heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Page scores (nd, pool heads, P) of the decode queries, by the selector's score over
        the pool's statistics or labels. With `kv_heads` (the pool's model KV heads), q holds
        every query head of the model."""

    def windows(self, call: PoolCall, decode: bool) -> tuple[int, int]:
        """(sink, local) for the streaming heads of `call` (or its sliding window)."""
        if call.window is not None:
            return call.window
        sp = self.sparsity
        if call.streaming is None or sp is None:
            return 0, 0
        return (sp.decode_sink, sp.decode_local) if decode else (sp.prefill_sink, sp.prefill_local)


def _scales(pool: KVCacheTensors, layer: int) -> dict[str, torch.Tensor]:
    """A PoolCall's FP8 scale arguments for one layer of `pool` (none when it is not FP8)."""
    if pool.k_scale is None or pool.v_scale is None:
        return {}
    return {"k_scale": pool.k_scale[layer], "v_scale": pool.v_scale[layer]}


def triton_head_dim_supported(head_dim: int) -> bool:
    """The Triton kernels hold a head's channels in one block: a power of two from 16 to 256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def resolve_backend_name(name: str, device: torch.device, head_dim: int = 128) -> str:
    """auto: Triton kernels on a CUDA GPU where they support the head size, the PyTorch
    reference elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        if not triton_head_dim_supported(head_dim):
            logger.warning("head_dim=%d is not a power of two from 16 to 256: attention runs on the PyTorch "
                           "backend (slower than the Triton kernels)", head_dim)
            return "torch"
        return "triton"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise NotSupportedError(
            "attention_backend='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for slow testing); "
            "use 'torch' on the CPU"
        )
    if name == "triton" and not triton_head_dim_supported(head_dim):
        raise NotSupportedError(
            f"attention_backend='triton' needs head_dim to be a power of two from 16 to 256, the model's is "
            f"{head_dim}; use 'torch' (or 'auto')"
        )
    return name


def create_backend(
    name: str,
    kv: KVCache | KVCacheTensors,
    num_heads: int,
    scale: float,
    sparsity: HeadSparsity | None = None,
    selector: PageSelector | None = None,
) -> AttentionBackend:
    from lserve.attention.torch_backend import TorchAttentionBackend

    backends: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}
    if name == "triton":
        from lserve.attention.triton_backend import TritonAttentionBackend

        backends["triton"] = TritonAttentionBackend
    return backends[name](kv, num_heads, scale, sparsity, selector)
