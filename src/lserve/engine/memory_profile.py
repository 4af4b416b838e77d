"""Start-up memory profiling on a GPU: how much the KV cache may take under `gpu_memory_utilization`.

vLLM's meaning: this engine may use `gpu_memory_utilization` of the GPU's total memory for
everything it holds (per engine: two engines at 0.45 share one GPU). The KV cache gets what is
left of that share after

- what the engine took since it started: weights and their buffers (the CUDA context, made by the
  first query, counts as before),
- the peak activation memory of the largest step the scheduler makes,
- the per-layer copies that grow with a prefill row's context (an FP8 cache's pages staged in the
  model's dtype for the prefill kernel; the torch backend's gathered K/V on a GPU), and
- the decode graphs' memory pool,

and never more than the memory that is free (other processes' memory is theirs).

The activations and graphs are measured, not guessed. The engine builds a provisional runtime on a
KV cache just large enough (`provisional_cache_config`), runs one prefill step of
`max_num_batched_tokens` prompt tokens through it (`step_activation_bytes`), measures the LM head
and what follows it over the most rows a step can have (`head_bytes`: the sampler at
`max_num_seqs` rows with a sort-wide top-p, or prompt log-probabilities over a chunk of rows,
whichever is larger), and captures the largest batch's decode graph in every selector mode
(`graph_pool_bytes`). The step's activations and the head's are added up, as a step does both.
The context copies are counted from their size per token (`MemoryProfile.context_bytes_per_token`):
a long prompt's last chunk reads its whole context, so they are bounded by `max_model_len` tokens
and by the tokens the cache itself can hold.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lserve.config import EngineConfig
from lserve.errors import LServeError
from lserve.runner.cuda_graphs import DecodeGraphs, batch_buckets
from lserve.runner.model_runner import PROMPT_LOGPROB_ROWS, ModelRunner
from lserve.runner.sampler import Sampler, token_logprobs
from lserve.runner.step import NewRequestData, ScheduledChunk, StepData
from lserve.sampling_params import SamplingParams

GiB = 2**30


@dataclass(frozen=True)
class MemoryProfile:
    """What the engine measured at start-up on a GPU, in bytes."""

    total: int
    """The GPU's memory."""
    utilization: float
    """`gpu_memory_utilization`: the share of `total` the engine may use."""
    in_use: int
    """What the engine took since it started (weights and their buffers)."""
    free: int
    """Free on the GPU after loading (what other processes hold is not ours to take)."""
    activations: int
    """Peak activation memory of the largest step and of the LM head's work after it."""
    graphs: int
    """The decode graphs' memory pool (0 without graphs)."""
    context_bytes_per_token: int = 0
    """Per-layer copies a prefill row makes per token of its context (0: none)."""
    kv_bytes_per_token: int = 1
    """KV cache bytes per token of context (every layer): what bounds the context copies."""
    max_context: int = 0
    """The longest context a row can have (`max_model_len`)."""

    @property
    def before_context(self) -> int:
        """Bytes for the KV cache and the context copies together."""
        share = int(self.total * self.utilization) - self.in_use
        return min(share, self.free) - self.activations - self.graphs

    @property
    def context_copies(self) -> int:
        """The context copies' peak: `max_context` tokens' worth, or less where the cache that is
        left beside them could not hold that many tokens."""
        c = self.context_bytes_per_token
        if not c:
            return 0
        room = max(self.before_context, 0) * c // (self.kv_bytes_per_token + c)
        return min(self.max_context * c, room)

    @property
    def kv_budget(self) -> int:
        """Bytes left for the KV cache (not positive: the share is spent before it)."""
        return self.before_context - self.context_copies

    def describe(self) -> str:
        share = self.total * self.utilization
        limited = (f" (limited to the {self.free / GiB:.2f} GiB free: other processes hold "
                   f"{(self.total - self.free - self.in_use) / GiB:.2f} GiB)"
                   if self.free < share - self.in_use else "")
        return (f"memory: {self.utilization:.2f} of {self.total / GiB:.1f} GiB = {share / GiB:.2f} GiB for this "
                f"engine{limited}; weights {self.in_use / GiB:.2f}, activations {self.activations / GiB:.2f}, "
                f"context copies {self.context_copies / GiB:.2f}, decode graphs {self.graphs / GiB:.2f}, "
                f"KV cache {max(self.kv_budget, 0) / GiB:.2f} GiB")

    def check(self) -> int:
        """The KV budget, or a clear error when nothing is left for it."""
        if self.kv_budget <= 0:
            raise LServeError(
                f"no GPU memory left for the KV cache: {self.describe()}. Raise gpu_memory_utilization, lower "
                "max_num_batched_tokens, max_num_seqs or max_model_len, or free the GPU of other processes")
        return self.kv_budget


def provisional_cache_config(config: EngineConfig, step_tokens: int, chunk_tokens: int) -> EngineConfig:
    """The engine config of the profiling runtime: a KV cache that holds one step of `step_tokens`
    prompt tokens cut into requests of at most `chunk_tokens` (the scheduler's chunk per request),
    plus one page, one seat per request. No memory share: the pages are counted exactly."""
    num_requests = -(-step_tokens // chunk_tokens)
    page_size = config.cache.page_size
    pages = num_requests * -(-chunk_tokens // page_size) + 1
    cache = dataclasses.replace(config.cache, num_kv_pages=pages, kv_cache_memory_fraction=None,
                                kv_cache_memory_bytes=None)
    scheduler = dataclasses.replace(config.scheduler, max_num_seqs=num_requests)
    return dataclasses.replace(config, cache=cache, scheduler=scheduler)


def profiling_step(step_tokens: int, chunk_tokens: int, page_size: int, vocab_size: int, seed: int) -> StepData:
    """One step of `step_tokens` random prompt tokens: requests of `chunk_tokens` tokens (the last
    one shorter), each on its own seat with its own pages, each computed whole in this step."""
    rng = np.random.default_rng(seed)
    new, chunks = [], []
    start, seat, page = 0, 0, 0
    while start < step_tokens:
        n = min(chunk_tokens, step_tokens - start)
        pages = -(-n // page_size)
        rid = f"profile-{seat}"
        new.append(NewRequestData(rid, rng.integers(0, vocab_size, n).tolist(), n,
                                  SamplingParams(temperature=0.0, max_tokens=1), frozenset(), seat,
                                  list(range(page, page + pages))))
        chunks.append(ScheduledChunk(rid, 0, n, samples=True))  # (greedy: the wide sampling is measured apart)
        start, seat, page = start + n, seat + 1, page + pages
    return StepData(chunks, 0, new_requests=new)


def _peak_during(device: torch.device, work: Callable[[], object]) -> int:
    """Bytes the caching allocator reserved at its peak during `work` beyond what it reserved
    before: reserved, not allocated, so that its rounding and fragmentation count (with allocated
    bytes a served engine went past its share: docs/benchmarks.md, the start-up memory profile)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # (cached free blocks would hide part of the work's peak)
    before = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    work()
    torch.cuda.synchronize(device)
    return max(torch.cuda.max_memory_reserved(device) - before, 0)


@torch.inference_mode()
def step_activation_bytes(runner: ModelRunner, step: StepData, device: torch.device) -> int:
    """Peak activation memory of running `step` (its KV writes go to the provisional cache)."""
    return _peak_during(device, lambda: runner.launch(step))


@torch.inference_mode()
def head_bytes(runner: ModelRunner, rows: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Peak memory of the LM head and what follows it in a step, the larger of: sampling `rows`
    rows with top-p alone (its candidates are the whole vocabulary: the widest sort), and prompt
    log-probabilities over one chunk of `PROMPT_LOGPROB_ROWS` rows."""
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1)] * rows
    ids = [f"profile-row-{i}" for i in range(rows)]
    sampler = Sampler(device, 0)
    model = runner.model

    def sample() -> None:
        hidden = torch.randn(rows, hidden_size, dtype=dtype, device=device)
        sampler.sample(model.compute_logits(hidden), ids, params, [None] * rows)

    def prompt_logprobs() -> None:
        hidden = torch.randn(PROMPT_LOGPROB_ROWS, hidden_size, dtype=dtype, device=device)
        logits = model.compute_logits(hidden)
        token_logprobs(logits, torch.zeros(PROMPT_LOGPROB_ROWS, dtype=torch.long, device=device), 20)

    return max(_peak_during(device, sample), _peak_during(device, prompt_logprobs))


def graph_pool_bytes(graphs: DecodeGraphs, modes: Sequence[str], max_batch: int, vocab_size: int,
                     device: torch.device) -> int:
    """Memory of every decode graph the engine will capture, from capturing the largest batch's in
    each mode: graphs share one pool, so the activations of the largest count once, and each other
    graph keeps only its logits alive (`rows x vocab` in the largest graph's logits dtype)."""
    largest = graphs.capture_all(modes, buckets=[max_batch])
    itemsize = graphs.logits_itemsize()
    others = sum(b for b in batch_buckets(max_batch) if b != max_batch) * vocab_size * itemsize * len(modes)
    return largest + others


def release(device: torch.device) -> None:
    """Return the provisional runtime's memory to the GPU (its objects must be dropped first)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def gpu_memory(device: torch.device) -> tuple[int, int]:
    """(used, total) bytes of the GPU as the driver sees them, after returning the allocator's
    free blocks."""
    release(device)
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free), int(total)
