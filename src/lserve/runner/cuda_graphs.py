"""CUDA graphs for pure decode steps (as vLLM): fixed batch-size buckets, persistent input buffers.

A decode step launches a few hundred small kernels; from Python each launch costs several
microseconds, which at long context with sparse attention is more than the GPU work itself.
A captured graph replays the whole forward (model, attention backend, page selection) as one
launch. Everything a graph reads lives in buffers allocated once; each step copies its inputs
into them and replays. Rows past the step's batch (up to the bucket size) are inert: they
write their K/V into a scratch page no request owns and read only that page.

The page selector has three modes ("none", "reuse", "select"); each (bucket, mode) pair is its own
graph. The engine captures them all at start-up (`capture_all`), so no request pays for a capture;
a pair that is missing is captured the first time it is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lserve.attention.backend import AttentionBackend
from lserve.attention.metadata import AttentionMetadata
from lserve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to max_batch (vLLM's capture sizes, roughly)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        max_batch: int,
        max_model_len: int,
        page_size: int,
        scratch_page: int,
        pool_scratch_pages: dict[str, int],
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.buckets = batch_buckets(max_batch)
        self.max_model_len = max_model_len
        self.page_size = page_size
        self.scratch_page = scratch_page
        self.device = device
        n = max_batch
        width = -(-max_model_len // page_size)
        self.width = width
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.page_table = torch.full((n, width), scratch_page, **i32)
        self.slot_mapping = torch.full((n,), scratch_page * page_size, dtype=torch.long, device=device)
        # (scratch page, page table, slots) buffers of the ring and window pools ("ring", "window")
        self.rings: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {
            name: (scratch, torch.full((n, width), scratch, **i32),
                   torch.full((n,), scratch * page_size, dtype=torch.long, device=device))
            for name, scratch in pool_scratch_pages.items()}
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _metadata(self, b: int) -> AttentionMetadata:
        """Metadata over the first `b` rows of the buffers. seq_lens_cpu says max_model_len so that
        the decode kernel's split count (chosen on the host) suits every later replay."""
        return AttentionMetadata(
            num_seqs=b, num_decodes=b, num_tokens=b, query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b], page_table=self.page_table[:b], slot_mapping=self.slot_mapping[:b],
            page_size=self.page_size, query_lens_cpu=(1,) * b, seq_lens_cpu=(self.max_model_len,) * b,
            ring_page_table=self._ring_rows("ring", 1, b), ring_slot_mapping=self._ring_rows("ring", 2, b),
            window_page_table=self._ring_rows("window", 1, b), window_slot_mapping=self._ring_rows("window", 2, b),
        )

    def _ring_rows(self, name: str, which: int, b: int) -> torch.Tensor | None:
        """The first `b` rows of a ring pool's page table (which=1) or slots (2); None without the pool."""
        entry = self.rings.get(name)
        return entry[which][:b] if entry is not None else None

    def _load(self, md: AttentionMetadata, input_ids: torch.Tensor, positions: torch.Tensor, b: int) -> None:
        """Copy the step's inputs into the buffers; rows md.num_seqs..b-1 point at the scratch page."""
        n, w = md.num_seqs, md.page_table.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.seq_lens[:n].copy_(md.seq_lens)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.page_table[:n, :w].copy_(md.page_table)
        if n < b:
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.seq_lens[n:b].fill_(1)
            self.slot_mapping[n:b].fill_(self.scratch_page * self.page_size)
            self.page_table[n:b, 0].fill_(self.scratch_page)
        for name, (scratch, table, slots) in self.rings.items():
            step_table, step_slots = getattr(md, f"{name}_page_table"), getattr(md, f"{name}_slot_mapping")
            assert step_table is not None and step_slots is not None, f"the step has no {name} tables"
            table[:n, :w].copy_(step_table)
            slots[:n].copy_(step_slots)
            if n < b:
                table[n:b, 0].fill_(scratch)
                slots[n:b].fill_(scratch * self.page_size)

    def _forward(self, b: int) -> torch.Tensor:
        md = self._metadata(b)
        backend = self.backend

        def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
            return backend.forward(q, k, v, layer_idx, md)

        hidden = self.model(self.input_ids[:b], self.positions[:b], attn)
        return self.model.compute_logits(hidden)

    def _capture(self, b: int, mode: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream (compiles kernels, settles the allocator), then capture. Both
        # run on the step's real inputs: writing the same K/V and selections again is harmless.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(b)
        logger.debug("captured a decode graph for batch %d (%s)", b, mode)
        return graph, logits

    @torch.inference_mode()
    def capture_all(self, modes: Sequence[str], buckets: Sequence[int] | None = None) -> int:
        """Capture every (bucket, mode) graph now (of `buckets`; default every bucket), on the
        buffers' inert scratch rows, with a progress bar; return the GPU memory they took (the
        caller logs it). Under inference mode, as the runner's steps are: with autograd on, the
        model would take its PyTorch paths instead of the fused kernels."""
        # (entering a capture empties the allocator's cache: empty it first, or its free blocks
        # would be counted against the graphs)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        # largest batch first, as vLLM: the graphs share one pool, and the smaller ones then fit
        # in what the largest one's activations left free
        pairs = [(b, mode) for b in sorted(self.buckets if buckets is None else buckets, reverse=True)
                 for mode in modes]
        for b, mode in tqdm(pairs, desc="Capturing decode graphs", leave=False):
            if (b, mode) in self._graphs:
                continue
            self.backend.prepare_for_capture(self._metadata(b), mode)
            self._graphs[(b, mode)] = self._capture(b, mode)
        torch.cuda.synchronize(self.device)
        return max(free_before - torch.cuda.mem_get_info(self.device)[0], 0)

    def logits_itemsize(self) -> int:
        """Bytes per logit of the captured graphs' outputs (each graph keeps its logits alive)."""
        return next(iter(self._graphs.values()))[1].element_size()

    def run(self, md: AttentionMetadata, input_ids: torch.Tensor, positions: torch.Tensor, mode: str) -> torch.Tensor:
        """Logits (md.num_seqs, vocab) of a pure decode step; the backend's `prepare(md)` ran already."""
        b = self.bucket(md.num_seqs)
        assert b is not None and md.num_decodes == md.num_seqs
        self._load(md, input_ids, positions, b)
        key = (b, mode)
        if key not in self._graphs:
            self._graphs[key] = self._capture(b, mode)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[: md.num_seqs]
