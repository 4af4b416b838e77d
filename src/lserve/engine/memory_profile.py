"""Start-up memory profiling on a GPU: how much the KV cache may take under `gpu_memory_utilization`.

vLLM's meaning: the engine may use `gpu_memory_utilization` of the GPU's total memory for
everything it holds. The KV cache gets what is left of that share after

- the memory in use once the weights are loaded (weights, CUDA context, other processes),
- the peak activation memory of the largest step the scheduler makes, and
- the decode graphs' memory pool.

The last two are measured, not guessed. The engine builds a provisional runtime on a KV cache
just large enough (`provisional_cache_config`), runs one prefill step of `max_num_batched_tokens`
prompt tokens through it (`step_activation_bytes`), samples `max_num_seqs` rows of logits with a
sort-wide top-p (`sampling_bytes`), and captures the largest batch's decode graph in every
selector mode (`graph_pool_bytes`). The activations of a step and of its sampling are added up, as
a step may both prefill its token budget and sample a row per request.
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
from lserve.runner.model_runner import ModelRunner
from lserve.runner.sampler import Sampler
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
    """In use after loading the weights (weights, CUDA context, other processes)."""
    activations: int
    """Peak activation memory of the largest step and its sampling."""
    graphs: int
    """The decode graphs' memory pool (0 without graphs)."""

    @property
    def kv_budget(self) -> int:
        """Bytes left for the KV cache (negative: the share is spent before it)."""
        return int(self.total * self.utilization) - self.in_use - self.activations - self.graphs

    def describe(self) -> str:
        return (f"memory: {self.utilization:.2f} of {self.total / GiB:.1f} GiB = "
                f"{self.total * self.utilization / GiB:.2f} GiB; in use after loading {self.in_use / GiB:.2f}, "
                f"activations {self.activations / GiB:.2f}, decode graphs {self.graphs / GiB:.2f}, "
                f"KV cache {max(self.kv_budget, 0) / GiB:.2f} GiB")

    def check(self) -> int:
        """The KV budget, or a clear error when nothing is left for it."""
        if self.kv_budget <= 0:
            raise LServeError(
                f"no GPU memory left for the KV cache: {self.describe()}. Raise gpu_memory_utilization, lower "
                "max_num_batched_tokens or max_num_seqs, or free the GPU of other processes")
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
    before: reserved, not allocated, so that its rounding and fragmentation count (measured on an
    H100 with allocated bytes, serving then took 0.5 GiB more than the share)."""
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
def sampling_bytes(runner: ModelRunner, rows: int, hidden_size: int, dtype: torch.dtype,
                   device: torch.device) -> int:
    """Peak memory of the LM head and the sampler over `rows` rows, each sampling with top-p alone
    (its candidates are the whole vocabulary: the widest sort)."""
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1)] * rows
    ids = [f"profile-row-{i}" for i in range(rows)]
    sampler = Sampler(device, 0)

    def work() -> None:
        hidden = torch.randn(rows, hidden_size, dtype=dtype, device=device)
        sampler.sample(runner.model.compute_logits(hidden), ids, params, [None] * rows)

    return _peak_during(device, work)


def graph_pool_bytes(graphs: DecodeGraphs, modes: Sequence[str], max_batch: int, vocab_size: int,
                     device: torch.device) -> int:
    """Memory of every decode graph the engine will capture, from capturing the largest batch's in
    each mode: graphs share one pool, so the activations of the largest count once, and each other
    graph keeps only its logits alive (`rows x vocab` in the largest graph's logits dtype)."""
    free_before = torch.cuda.mem_get_info(device)[0]
    graphs.capture_all(modes, buckets=[max_batch])
    torch.cuda.synchronize(device)
    largest = free_before - torch.cuda.mem_get_info(device)[0]
    itemsize = graphs.logits_itemsize()
    others = sum(b for b in batch_buckets(max_batch) if b != max_batch) * vocab_size * itemsize * len(modes)
    return max(largest, 0) + others


def release(device: torch.device) -> None:
    """Return the provisional runtime's memory to the GPU (its objects must be dropped first)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def memory_in_use(device: torch.device) -> tuple[int, int]:
    """(in use, total) bytes of the GPU, with the caching allocator's free blocks returned first."""
    release(device)
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free), int(total)
