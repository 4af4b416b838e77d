"""The engine core: token ids in, token ids out. One `step()` = schedule -> execute -> update.

It builds the model, the KV cache, the attention backend, the runner and the scheduler once, and
validates each request on admission so that nothing that cannot be served enters the queues.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lserve.attention.backend import create_backend, resolve_backend_name
from lserve.attention.sparsity import HeadSparsity
from lserve.config import EngineConfig
from lserve.engine.scheduler import Scheduler, SchedulerOutput
from lserve.engine.stats import EngineStats
from lserve.errors import LServeError, NotSupportedError, RequestRejected
from lserve.kv_cache.layout import KVCacheTensors, KVShape, plan_num_pages
from lserve.kv_cache.manager import KVCacheManager
from lserve.model.config import ArchConfig
from lserve.model.loader import ModelSource, load_model, read_arch_config, resolve_source
from lserve.request import Request, RequestStatus
from lserve.runner.model_runner import ModelRunner, StepInput
from lserve.sampling_params import SamplingParams
from lserve.sparse.patterns import binarize, load_pattern, shipped_pattern

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class StepResult:
    changed: list[Request]
    """Requests that got a new token this step (finished ones included)."""
    finished: list[Request]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LServeError("device='cuda' was requested but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, arch: ArchConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and less exact
    return torch.float16 if arch.torch_dtype == "float16" else torch.bfloat16


def check_supported(config: EngineConfig) -> None:
    """Reject valid settings this version cannot honour yet, rather than ignoring them."""
    sparse = config.sparse
    if sparse.uses_page_selection:
        raise NotSupportedError("dynamic page selection (token_budget > 0) is not implemented yet; use token_budget=0")


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        check_supported(config)
        self.config = config
        self.device = resolve_device(config.model.device)
        self.backend_name = resolve_backend_name(config.attention_backend, self.device)
        self.source: ModelSource = resolve_source(config.model.model, config.model.load_format)
        self.arch, rope_factors = read_arch_config(self.source)
        self.dtype = resolve_dtype(config.model.dtype, self.arch, self.device)
        self.max_model_len = self._resolve_max_model_len()
        self.model = load_model(self.source, self.arch, rope_factors, self.dtype, self.device, config.model.seed)
        self._init_kv_cache()
        sched = config.scheduler
        self.scheduler = Scheduler(self.kv_manager, sched.max_num_seqs, sched.max_num_batched_tokens)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_decode_steps = 0
        self.decode_pages_read = 0
        self.decode_pages_dense = 0
        self.last_decode_pages_read_fraction = 1.0

    def _resolve_max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        if self.arch.sliding_window:
            limit = min(limit, self.arch.sliding_window)  # sliding-window attention is not implemented
        wanted = self.config.model.max_model_len
        if wanted is None:
            return limit
        if wanted > limit and self.source.load_format != "dummy":
            raise LServeError(
                f"max_model_len={wanted} is greater than the model's limit of {limit} tokens"
            )
        return wanted

    def _init_kv_cache(self) -> None:
        cache = self.config.cache
        shape = KVShape(self.arch.num_layers, self.arch.num_kv_heads, self.arch.head_dim, cache.page_size, self.dtype)
        pages_per_seq = -(-self.max_model_len // cache.page_size)
        num_pages = plan_num_pages(
            shape,
            self.device,
            num_kv_pages=cache.num_kv_pages,
            memory_fraction=cache.kv_cache_memory_fraction,
            max_useful_pages=self.config.scheduler.max_num_seqs * pages_per_seq,
        )
        self.kv_tensors = KVCacheTensors(shape, num_pages, self.device)
        self.kv_manager = KVCacheManager(num_pages, cache.page_size)
        backend = create_backend(self.backend_name, self.kv_tensors, self.arch.num_heads, self.arch.head_dim**-0.5,
                                 self._head_sparsity())
        self.runner = ModelRunner(self.model, backend, cache.page_size, self.device, self.config.model.seed)
        logger.info("KV cache: %d pages of %d tokens (%.1f MiB)", num_pages, cache.page_size,
                    num_pages * shape.bytes_per_page / 2**20)

    def _head_sparsity(self) -> HeadSparsity | None:
        """Streaming-head flags per layer from the head pattern, binarised at `streaming_sparsity`."""
        sparse = self.config.sparse
        if not sparse.uses_streaming_heads:
            return None
        path = sparse.attn_pattern or shipped_pattern(self.source.name)
        if path is None:
            raise LServeError(
                f"streaming_sparsity={sparse.streaming_sparsity} needs a head pattern and none ships for "
                f"{self.source.name}: pass attn_pattern (a DuoAttention full_attention_heads.tsv or an lserve "
                "pattern .json)"
            )
        pattern = load_pattern(path)
        pattern.check_model(self.arch.num_layers, self.arch.num_kv_heads)
        flags = binarize(pattern.scores, sparse.streaming_sparsity).to(self.device)
        logger.info("streaming heads: %d of %d KV heads (%s)", int(flags.sum()), flags.numel(), pattern.source)
        return HeadSparsity(
            tuple(flags[i] for i in range(self.arch.num_layers)),
            sparse.prefill_sink_tokens, sparse.prefill_local_tokens,
            sparse.decode_sink_tokens, sparse.decode_local_tokens,
        )

    # ---- requests --------------------------------------------------------------------------

    def make_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, eos_token_ids: frozenset[int]
    ) -> Request:
        """Validate a request against the model and the cache; raise RequestRejected with the reason."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise RequestRejected(f"token id {bad[0]} is out of the vocabulary range [0, {self.arch.vocab_size})")
        if n >= self.max_model_len:
            raise RequestRejected(
                f"the prompt ({n} tokens) leaves no room to generate: the maximum model length is "
                f"{self.max_model_len} tokens"
            )
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - n)
        need = self.kv_manager.pages_for(n + max_tokens)
        if need > self.kv_manager.num_pages:
            raise RequestRejected(
                f"the request needs {need} KV pages ({n} prompt + {max_tokens} output tokens) but the cache "
                f"has only {self.kv_manager.num_pages}; raise num_kv_pages or lower max_tokens"
            )
        return Request(request_id, list(prompt_token_ids), params, max_tokens, eos_token_ids)

    def add_request(self, request: Request) -> None:
        if self.scheduler.find(request.request_id) is not None:
            raise RequestRejected(f"request id {request.request_id!r} is already in use")
        self.scheduler.add_request(request)
        self.num_prompt_tokens += request.num_prompt_tokens

    def abort_request(self, request_id: str) -> Request | None:
        """Stop a request and free its pages at once; None if it is unknown or already finished."""
        req = self.scheduler.find(request_id)
        if req is not None:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self.runner.sampler.forget(request_id)
        return req

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request for a reason found outside the core (a stop string in its text)."""
        req = self.scheduler.find(request_id)
        if req is not None:
            self.scheduler.finish(req, status)
            self.runner.sampler.forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        """A snapshot of queue sizes, cache use and counters (cheap; safe to call every step)."""
        sparsity = self.runner.backend.sparsity
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_pages_total=self.kv_manager.num_pages,
            kv_pages_used=self.kv_manager.num_pages - self.kv_manager.num_free_pages,
            streaming_head_fraction=sparsity.streaming_fraction if sparsity is not None else 0.0,
            last_decode_pages_read_fraction=self.last_decode_pages_read_fraction,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_decode_steps=self.num_decode_steps,
            decode_pages_read=self.decode_pages_read,
            decode_pages_dense=self.decode_pages_dense,
        )

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> StepResult:
        out = self.scheduler.schedule()
        if out.is_empty:
            return StepResult([], [])
        sampled = self.runner.execute(self._step_inputs(out), out.num_decodes)
        changed = self.scheduler.update(out, sampled)
        self.num_generation_tokens += len(changed)
        finished = [r for r in changed if r.is_finished]
        for r in finished:
            self.runner.sampler.forget(r.request_id)
        return StepResult(changed, finished)

    def _step_inputs(self, out: SchedulerOutput) -> list[StepInput]:
        tables = self.kv_manager.page_tables
        return [StepInput(s.request, s.num_new_tokens, tables[s.request.request_id], s.samples) for s in out.scheduled]
