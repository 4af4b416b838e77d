"""The engine core: token ids in, token ids out. One `step()` = schedule -> execute -> update.

It builds the model, the KV cache, the attention backend, the runner and the scheduler once, and
validates each request on admission so that nothing that cannot be served enters the queues.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass

import torch

from lserve.attention.backend import (
    StepPageCounts,
    create_backend,
    resolve_backend_name,
)
from lserve.attention.page_selector import PageSelector
from lserve.attention.sparsity import HeadSparsity
from lserve.config import DEFAULT_PAGE_SIZE, EngineConfig
from lserve.engine.kv_setup import KVSetup, build_kv_cache
from lserve.engine.memory_profile import (
    MemoryProfile,
    gpu_memory,
    graph_pool_bytes,
    head_bytes,
    profiling_step,
    provisional_cache_config,
    release,
    step_activation_bytes,
)
from lserve.engine.scheduler import Scheduler, SchedulerOutput
from lserve.engine.stats import EngineStats
from lserve.engine.step_builder import StepBuilder
from lserve.engine.tp_workers import (
    WorkerGroup,
    agree_min,
    check_devices,
    check_no_group,
    free_port,
    init_distributed,
)
from lserve.errors import LServeError, RequestRejected
from lserve.kv_cache.layout import KVCache, stats_bytes_per_page
from lserve.kv_cache.manager import KVCacheManager
from lserve.model.config import ArchConfig
from lserve.model.loader import (
    ModelSource,
    load_model,
    read_arch_config,
    resolve_source,
)
from lserve.model.parallel import TensorParallel, balanced_kv_order, shard_config
from lserve.request import Request, RequestStatus
from lserve.runner.cuda_graphs import DecodeGraphs
from lserve.runner.model_runner import LaunchedStep, ModelRunner
from lserve.runner.step import StepData
from lserve.sampling_params import SamplingParams
from lserve.sparse.patterns import HeadPattern, binarize, load_pattern, shipped_pattern
from lserve.sparse.selection import ScoreSpec, local_window_fits, pattern_page_size, resolve_page_score

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


class EngineCore:
    def __init__(self, config: EngineConfig, tp: TensorParallel | None = None, init_method: str | None = None) -> None:
        """The engine core of tensor-parallel rank `tp` (None: rank 0, which spawns the other ranks
        when `tensor_parallel_size` > 1; they build their cores with their rank and `init_method`)."""
        self.config = config
        size = config.parallel.tensor_parallel_size
        self.tp = tp if tp is not None else TensorParallel(0, size)
        self.device = resolve_device(config.model.device)
        self.source: ModelSource = resolve_source(config.model.model, config.model.load_format)
        self.arch, rope_factors = read_arch_config(self.source)
        self._pattern: HeadPattern | None = None
        self.config = config = self._resolve_page_size(config)
        self.backend_name = resolve_backend_name(config.attention_backend, self.device, self.arch.head_dim)
        self.local_arch = shard_config(self.arch, self.tp)
        """This rank's shard of the model: its heads (the KV cache and attention see only these)."""
        self.workers: WorkerGroup | None = None
        if size > 1:
            if self.tp.rank == 0:  # checks before any process starts
                check_devices(size, self.device)
                check_no_group()
                init_method = f"tcp://127.0.0.1:{free_port()}"
                self.workers = WorkerGroup(config, size, init_method)
                weakref.finalize(self, self.workers.close)
            assert init_method is not None
            init_distributed(self.tp, init_method, self.device)
            if self.workers is not None:
                self.workers.owns_group = True
        self.dtype = resolve_dtype(config.model.dtype, self.arch, self.device)
        self.max_model_len = self._resolve_max_model_len()
        self.prefix_caching = self._resolve_prefix_caching()
        # The ring and window pools hold per-request state that a cached prefix cannot restore:
        # with the prefix cache, streaming heads and sliding-window layers keep their whole
        # history in the paged pool (their windows still apply; their memory savings do not)
        self.fixed_pools = not self.prefix_caching
        self.kv_order = self._kv_head_order()
        """Under tensor parallelism with streaming heads, each layer's KV heads in the order whose
        equal slices go to the ranks (balanced streaming heads); None: the model's order."""
        # (what the GPU held before this engine: the start-up profile counts only what it takes)
        self._gpu_used_at_start = gpu_memory(self.device)[0] if self._profiles_memory() else 0
        self.model = load_model(self.source, self.arch, rope_factors, self.dtype, self.device, config.model.seed,
                                tp=self.tp, kv_order=self.kv_order, quantization=config.model.quantization)
        self._init_kv_cache()
        if self.workers is not None:
            self.workers.wait_ready()
        sched = config.scheduler
        self.scheduler = Scheduler(self.kv_manager, self.num_seats, sched.max_num_batched_tokens)
        self.async_scheduling = sched.async_scheduling
        self._pending: list[tuple[SchedulerOutput, LaunchedStep, StepPageCounts]] = []
        """Launched steps whose tokens have not been read yet, oldest first (async scheduling keeps
        one between calls, synchronous steps none; a step whose reading was interrupted stays
        until it is read)."""
        self.last_step_num_tokens = 0
        """Tokens (prompt and decode) of the batch the last `step()` call launched (0: none)."""
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_decode_steps = 0
        self.decode_pages_read = 0
        self.decode_pages_dense = 0
        self.last_decode_pages_read_fraction = 1.0

    def _resolve_page_size(self, config: EngineConfig) -> EngineConfig:
        """`config` with its page size chosen: the setting, else the model pattern's calibrated one
        where page selection takes the pattern's choice (`token_budget` > 0, `page_score=auto`),
        else `DEFAULT_PAGE_SIZE`. Everything after reads `config.cache.page_size`."""
        if config.cache.page_size is not None:
            return config
        sparse, page = config.sparse, DEFAULT_PAGE_SIZE
        if sparse.uses_page_selection and sparse.page_score == "auto" and (pattern := self._head_pattern()) is not None:
            chosen = pattern_page_size(pattern.selection, pattern.source)
            if chosen is not None:
                page = chosen
                logger.info("KV pages of %d tokens, as the page selection of %s was calibrated (set page_size "
                            "for another)", page, pattern.source)
        return config.with_page_size(page)

    def _resolve_prefix_caching(self) -> bool:
        """`enable_prefix_caching`, or unset: on unless it would cost the ring or window pool's
        memory savings (streaming heads, or a sliding-window model with its window pool)."""
        cache = self.config.cache
        if cache.enable_prefix_caching is not None:
            return cache.enable_prefix_caching
        streaming = self.config.sparse.streaming_sparsity > 0  # (a pattern alone, at 0, streams no head)
        pools = streaming or (cache.window_pool and any(w is not None for w in self.arch.layer_windows))
        if pools:
            logger.info("prefix caching is off: it would keep the %s in the paged pool (enable_prefix_caching=True "
                        "turns it on)", "streaming heads" if streaming else "sliding-window layers")
        return not pools

    def _resolve_max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        wanted = self.config.model.max_model_len
        if wanted is None:
            return limit
        if wanted > limit and self.source.load_format != "dummy":
            raise LServeError(
                f"max_model_len={wanted} is greater than the model's limit of {limit} tokens"
            )
        return wanted

    def _init_kv_cache(self) -> None:
        """Size and allocate the KV memory (`engine.kv_setup`; on a GPU from a start-up memory
        profile, `engine.memory_profile`), then build the page selector, the attention backend,
        the runner and (on a GPU) its decode graphs."""
        cache, sparse = self.config.cache, self.config.sparse
        sparsity = self._head_sparsity()
        self.streaming_head_fraction = sparsity.streaming_fraction if sparsity is not None else 0.0
        self.page_score = self._page_score() if sparse.uses_page_selection else None
        self.selection_local_tokens = self._selection_local_tokens() if self.page_score is not None else 0
        config = self.config
        if self._profiles_memory():
            budget = self._profile_memory(sparsity)
            config = dataclasses.replace(config, cache=dataclasses.replace(cache, kv_cache_memory_bytes=budget))
        elif self.device.type == "cuda" and cache.num_kv_pages is None and cache.kv_cache_memory_bytes is None \
                and cache.kv_cache_memory_fraction is None:
            # tensor-parallel ranks are not profiled: gpu_memory_utilization of the memory free after loading
            config = dataclasses.replace(config, cache=dataclasses.replace(
                cache, kv_cache_memory_fraction=cache.gpu_memory_utilization))
        setup = self._build_kv(config, sparsity)
        self.kv_cache = setup.cache
        self.kv_tensors = setup.cache.paged
        self.num_seats = seats = setup.num_seats
        self.kv_manager = KVCacheManager(setup.num_pages, cache.page_size, seats,
                                         enable_caching=self.prefix_caching)
        self.runner = self._build_runner(setup, sparsity, seats)
        self.step_builder = StepBuilder(self.kv_manager, self.arch.vocab_size)
        if self._uses_graphs():
            self.runner.graphs = self._decode_graphs(self.runner, setup, seats)
            start = time.perf_counter()
            modes = self._graph_modes()
            used = self.runner.graphs.capture_all(modes)
            logger.info("captured %d decode graphs (batch sizes %s x %s) in %.1f s, %.2f GiB",
                        len(self.runner.graphs.buckets) * len(modes), ",".join(map(str, self.runner.graphs.buckets)),
                        "/".join(modes), time.perf_counter() - start, used / 2**30)

    def _build_kv(self, config: EngineConfig, sparsity: HeadSparsity | None, log: bool = True) -> KVSetup:
        agree = (lambda n: agree_min(n, self.device)) if self.tp.size > 1 else (lambda n: n)
        return build_kv_cache(self.local_arch, config, self.dtype, self.device,
                              sparsity.streaming_heads if sparsity is not None else None, self.page_score,
                              fixed_pools=self.fixed_pools,
                              max_model_len=self.max_model_len, agree=agree, log=log)

    def _build_runner(self, setup: KVSetup, sparsity: HeadSparsity | None, selector_seats: int) -> ModelRunner:
        """The page selector (for `selector_seats` requests), attention backend and runner over `setup`."""
        cache, sparse, arch = self.config.cache, self.config.sparse, self.arch
        selector = None
        if sparse.uses_page_selection:
            assert self.page_score is not None
            shape = setup.cache.shape
            selector = PageSelector(
                [shape.layer_heads(i) for i in range(arch.num_layers)], cache.page_size, sparse.token_budget,
                self.page_score.interval, selector_seats, self.device, sparse.num_dense_layers,
                score=self.page_score.kind,
                top_p=sparse.selection_top_p, min_tokens=sparse.selection_min_tokens,
                local_tokens=self.selection_local_tokens,
                # a score summed over a GQA group is about `group` logits: their mean's softmax scale;
                # rope_mass is a log-mass already
                temperature=1.0 if self.page_score.kind == "rope_mass"
                else arch.attention_scale / (arch.num_heads // arch.num_kv_heads),
            )
        backend = create_backend(self.backend_name, setup.cache, self.local_arch.num_heads, arch.attention_scale,
                                 sparsity, selector)
        if self.backend_name == "triton":
            backend.decode_split_len = self.max_model_len
        return ModelRunner(self.model, backend, cache.page_size, self.device, self.config.model.seed)

    def _uses_graphs(self) -> bool:
        # (decode graphs with collectives inside are not validated yet: tensor-parallel steps run eagerly)
        return self.device.type == "cuda" and self.backend_name == "triton" and not self.config.model.enforce_eager \
            and self.tp.size == 1

    def _graph_modes(self) -> tuple[str, ...]:
        return ("none", "reuse", "select") if self.config.sparse.uses_page_selection else ("none",)

    def _decode_graphs(self, runner: ModelRunner, setup: KVSetup, max_batch: int) -> DecodeGraphs:
        """Decode graphs over `setup`'s cache for batches up to `max_batch` (not captured yet)."""
        return DecodeGraphs(self.model, runner.backend, max_batch, self.max_model_len, self.config.cache.page_size,
                            scratch_page=setup.num_pages,
                            pool_scratch_pages={name: pages.scratch_page for name, pages in runner.ring_pages.items()},
                            device=self.device)

    def _profiles_memory(self) -> bool:
        """The KV cache is sized from `gpu_memory_utilization` and a start-up profile: on one GPU
        when no explicit size (pages, bytes or a share of free memory) is given."""
        cache = self.config.cache
        explicit = (cache.num_kv_pages, cache.kv_cache_memory_bytes, cache.kv_cache_memory_fraction)
        return self.device.type == "cuda" and self.tp.size == 1 and all(v is None for v in explicit)

    def _profile_memory(self, sparsity: HeadSparsity | None) -> int:
        """The KV cache's bytes under `gpu_memory_utilization`, from a provisional runtime's
        largest step, widest head work and largest decode graphs (`engine.memory_profile`)."""
        used, total = gpu_memory(self.device)
        sched, page = self.config.scheduler, self.config.cache.page_size
        chunk = min(sched.max_num_batched_tokens, self.max_model_len - 1)
        setup = self._build_kv(provisional_cache_config(self.config, sched.max_num_batched_tokens, chunk), sparsity,
                               log=False)
        runner = self._build_runner(setup, sparsity, max(setup.num_seats, sched.max_num_seqs))
        step = profiling_step(sched.max_num_batched_tokens, chunk, page, self.arch.vocab_size, self.config.model.seed)
        activations = step_activation_bytes(runner, step, self.device) + head_bytes(
            runner, sched.max_num_seqs, self.arch.hidden_size, self.dtype, self.device)
        graphs = 0
        if self._uses_graphs():
            graphs = graph_pool_bytes(self._decode_graphs(runner, setup, sched.max_num_seqs), self._graph_modes(),
                                      sched.max_num_seqs, self.arch.vocab_size, self.device)
        shape = setup.cache.shape
        kv_per_token = self._paged_page_bytes(setup.cache) // page
        # copies per layer that grow with a prefill row's context: an FP8 cache's pages staged in
        # the model's dtype (Triton), or the torch backend's gathered K and V
        copies = self.backend_name == "torch" or shape.quantized
        heads = max(shape.layer_heads(i) for i in range(self.arch.num_layers))
        context = 2 * heads * self.arch.head_dim * self.dtype.itemsize if copies else 0
        del runner, setup
        release(self.device)
        profile = MemoryProfile(total, self.config.cache.gpu_memory_utilization, max(used - self._gpu_used_at_start, 0),
                                total - used, activations, graphs, context, max(kv_per_token, 1), self.max_model_len)
        logger.info("%s", profile.describe())
        return profile.check()

    def kv_bytes_per_sequence(self, num_tokens: int) -> int:
        """KV memory one decoding sequence of `num_tokens` tokens holds: its pages, plus its ring and
        window pages (at most their sinks and windows)."""
        cache = self.kv_cache
        return -(-num_tokens // cache.shape.page_size) * self._paged_page_bytes(cache) + cache.ring_bytes_per_sequence()

    def _paged_page_bytes(self, cache: KVCache) -> int:
        """Bytes of one page of `cache`'s paged pool: K and V (scales included) and the page
        score's statistics or labels."""
        label_r = self.page_score.num_channels if self.page_score is not None else 0
        fp8 = self.page_score is not None and self.page_score.label_fp8
        return cache.shape.bytes_per_page + stats_bytes_per_page(cache.shape, cache.paged.logical_page_size, label_r,
                                                                 fp8)

    def _selection_local_tokens(self) -> int:
        """`selection_local_tokens`, or unset: the pattern's calibrated value for its page score,
        where it combines with the other settings (no top-p; the budget keeps at least one page
        for the score beside the first, the local and the newest pages), else 0."""
        sparse, page = self.config.sparse, self.config.cache.page_size
        if sparse.selection_local_tokens is not None:
            return sparse.selection_local_tokens
        assert self.page_score is not None
        local = self.page_score.local_tokens or 0
        if local and (sparse.selection_top_p is not None or not local_window_fits(local, sparse.token_budget, page)):
            logger.info("page selection: the pattern's selection_local_tokens=%d is not used (%s)", local,
                        "top-p selection" if sparse.selection_top_p is not None
                        else f"token_budget={sparse.token_budget} leaves no page for the score beside it")
            return 0
        return local

    def _head_pattern(self) -> HeadPattern | None:
        """The model's head pattern: `attn_pattern`, else the one shipped for the model, else None."""
        if self._pattern is None:
            path = self.config.sparse.attn_pattern or shipped_pattern(self.source.name)
            if path is not None:
                self._pattern = load_pattern(path)
                self._pattern.check_model(self.arch.num_layers, self.arch.num_kv_heads)
        return self._pattern

    def _page_score(self) -> ScoreSpec:
        """The page score of page selection: the setting, or for `auto` the pattern's calibrated choice."""
        sparse, arch = self.config.sparse, self.arch
        pattern = self._head_pattern() if sparse.page_score in ("auto", "label_channels") else None
        spec = resolve_page_score(sparse.page_score, sparse.score_channels, pattern.selection if pattern else None,
                                  self.model.rotary.inv_freq.cpu(), arch.num_layers, arch.num_kv_heads,
                                  pattern.source if pattern else "", sparse.selector_interval, sparse.label_dtype)
        if self.tp.size > 1 and spec.channels is not None:
            spec = dataclasses.replace(spec, channels=self._rank_heads(spec.channels))
        logger.info("page selection: %s scores%s, re-selected every %d decode steps (%s)", spec.kind,
                    f" on {spec.num_channels} key channels{' (FP8 labels)' if spec.label_fp8 else ''}"
                    if spec.uses_labels else "", spec.interval, spec.source)
        return spec

    def _streaming_flags(self) -> torch.Tensor | None:
        """(layers, KV heads) bool of the model's streaming heads: the head pattern binarised at
        `streaming_sparsity` (None: no streaming heads)."""
        sparse = self.config.sparse
        if not sparse.uses_streaming_heads:
            return None
        pattern = self._head_pattern()
        if pattern is None or (sparse.streaming_sparsity > 0 and not pattern.calibrated_for_streaming):
            found = "none ships" if pattern is None else f"{pattern.source} has no streaming-head calibration"
            raise LServeError(
                f"streaming_sparsity={sparse.streaming_sparsity} needs a head pattern and {found} for "
                f"{self.source.name}: pass attn_pattern (a DuoAttention full_attention_heads.tsv or an lserve "
                "pattern .json from `lserve calibrate`)"
            )
        full = self.arch.full_attention_layers  # sliding-window layers keep their own window
        return binarize(pattern.scores, sparse.streaming_sparsity, full)

    def _kv_head_order(self) -> list[list[int]] | None:
        flags = self._streaming_flags() if self.tp.size > 1 else None
        if flags is None:
            return None
        return [balanced_kv_order(row.tolist(), self.tp.size) for row in flags]

    def _rank_heads(self, per_head: torch.Tensor) -> torch.Tensor:
        """(layers, KV heads, ...) of the model's heads -> this rank's heads (in `kv_order`)."""
        if self.tp.size == 1:
            return per_head
        if self.kv_order is not None:
            per_head = torch.stack([per_head[i, order] for i, order in enumerate(self.kv_order)])
        heads = self.local_arch.num_kv_heads
        return per_head[:, self.tp.rank * heads:(self.tp.rank + 1) * heads]

    def _head_sparsity(self) -> HeadSparsity | None:
        """This rank's streaming-head flags per layer (`_streaming_flags`), with their windows."""
        sparse = self.config.sparse
        flags = self._streaming_flags()
        if flags is None:
            return None
        flags = self._rank_heads(flags).to(self.device)
        logger.info("streaming heads: %d of %d KV heads of full-attention layers (%s)", int(flags.sum()),
                    len(self.arch.full_attention_layers) * self.local_arch.num_kv_heads, self._pattern.source
                    if self._pattern is not None else "")
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
        vocab = self.arch.vocab_size
        for name, ids in (("", prompt_token_ids), ("logit_bias: ", params.logit_bias or ()),
                          ("allowed_token_ids: ", params.allowed_token_ids or ())):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestRejected(f"{name}token id {bad} is out of the vocabulary range [0, {vocab})")
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

    def add_forked_requests(self, requests: list[Request]) -> None:
        """Sequences with the same prompt (`n` > 1): a prefill-only prefix (the prompt but its last
        token) computes the shared KV once; each sequence then forks from it, sharing its full
        pages, and computes the last prompt token itself (its own first sample). A prompt of one
        token has nothing to share, and a request for prompt log-probabilities computes them per
        sequence: those sequences run on their own."""
        prompt = requests[0].prompt_token_ids
        assert all(r.prompt_token_ids == prompt for r in requests)
        for r in requests:
            if self.scheduler.find(r.request_id) is not None:
                raise RequestRejected(f"request id {r.request_id!r} is already in use")
        if len(prompt) < 2 or len(requests) < 2 or requests[0].sampling_params.prompt_logprobs is not None:
            # (prompt log-probabilities need each sequence to compute its prompt's logits)
            for r in requests:
                self.add_request(r)
            return
        prefix_id = f"{requests[0].request_id}#prefix"
        # (max_tokens 1 keeps it schedulable until its prompt is computed; it never samples)
        prefix = Request(prefix_id, prompt[:-1], requests[0].sampling_params, 1, prefill_only=True)
        for r in requests:
            r.fork_of = prefix_id
        self.scheduler.add_group(prefix, requests)
        self.num_prompt_tokens += len(prompt) * len(requests)

    def abort_request(self, request_id: str) -> Request | None:
        """Stop a request and free its pages at once; None if it is unknown or already finished."""
        req = self.scheduler.find(request_id)
        if req is not None:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self._flush_ended()
        return req

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request for a reason found outside the core (a stop string in its text)."""
        req = self.scheduler.find(request_id)
        if req is not None:
            self.scheduler.finish(req, status)
            self._flush_ended()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

    def stats(self) -> EngineStats:
        """A snapshot of queue sizes, cache use and counters (cheap; safe to call every step)."""
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_pages_total=self.kv_manager.num_pages,
            kv_pages_used=self.kv_manager.num_pages - self.kv_manager.num_free_pages,
            streaming_head_fraction=self.streaming_head_fraction,
            last_decode_pages_read_fraction=self.last_decode_pages_read_fraction,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_decode_steps=self.num_decode_steps,
            decode_pages_read=self.decode_pages_read,
            decode_pages_dense=self.decode_pages_dense,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
        )

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> StepResult:
        """One engine step: the requests that got a token (and those of them that finished).

        With async scheduling (the default) a step schedules and launches the next batch first and
        then reads the tokens of the batch launched by the previous call, so the host's work
        (scheduling, metadata, copies, the launch itself, detokenizing) overlaps the device's.
        Each call still returns one token per running request; the first call returns none.
        """
        result = self._step()
        self._flush_ended()
        return result

    def _flush_ended(self) -> None:
        """Tell the runner now of requests that ended after the last launch (their state would
        otherwise wait for the next step, and an idle engine has none)."""
        self._take_ended()
        ended = self.step_builder.flush()
        if ended is not None:
            if self.workers is not None:
                self.workers.send("update", ended)
            self.runner.update_states(ended)

    def _take_ended(self) -> None:
        """Requests the scheduler ended: the runner drops their state (its tokens, page table,
        sampler generator and page selection) with the next step it is sent."""
        for rid in self.scheduler.take_ended():
            self.step_builder.forget(rid)

    def _schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        for rid in out.preempted:  # (a schedule that preempts may schedule nothing)
            self.step_builder.preempted(rid)
        return out

    def _step(self) -> StepResult:
        self.last_step_num_tokens = 0
        if not self.async_scheduling:
            # through the pending list too: a read interrupted while waiting leaves its step
            # pending, and the next call reads it instead of launching another
            if not self._pending:
                out = self._schedule()
                if out.is_empty:
                    return StepResult([], [])
                self._pending.append((out, *self._launch(out)))
            return self._resolve_oldest()
        if len(self._pending) > 1:  # left by an interrupted read: catch up before launching more
            return self._resolve_oldest()
        resolved = None
        if self._pending and self._needs_tokens_first():
            resolved = self._resolve_oldest()
        out = self._schedule()
        if not out.is_empty:
            self._pending.append((out, *self._launch(out)))
        if resolved is not None:
            return resolved
        if len(self._pending) > 1 or (self._pending and out.is_empty):
            return self._resolve_oldest()
        return StepResult([], [])

    def _launch(self, out: SchedulerOutput) -> tuple[LaunchedStep, StepPageCounts]:
        """Queue the scheduled batch on the device; its tokens count as computed (and in flight).
        Returns the launch and the KV pages its decode rows read (engine totals count them now:
        the device reads them whatever becomes of the tokens)."""
        self._take_ended()
        step = self.step_builder.build([(s.request, s.num_new_tokens, s.samples) for s in out.scheduled],
                                       out.num_decodes, out.forks)
        if self.workers is None:
            launched = self.runner.launch(step)
        else:
            launched = self._launch_on_ranks(step)
        self.last_step_num_tokens = out.num_tokens
        counts = launched.page_counts
        assert counts is not None
        if counts.stored is None:  # (a top-p selection's counts are added once the step has run)
            self._count_decode_pages(counts)
        self.scheduler.advance(out)
        return launched, counts

    def _launch_on_ranks(self, step: StepData) -> LaunchedStep:
        """Launch on every rank. A failure leaves the ranks out of step (some inside the step's
        collectives): the group is closed and this engine refuses further steps."""
        workers = self.workers
        assert workers is not None
        if workers.failed is not None:
            raise LServeError(f"the tensor-parallel engine stopped after an error ({workers.failed}); build a new one")
        try:
            workers.send("launch", step)
            return self.runner.launch(step)
        except BaseException as exc:
            reason = workers.error_lines() or f"{type(exc).__name__} on rank 0"
            workers.failed = reason
            workers.close()
            if isinstance(exc, LServeError):
                raise
            raise LServeError(f"the tensor-parallel engine stopped: {reason}") from exc

    def drain(self) -> None:
        """Read every launched step whose tokens nobody waits for any more (their requests are
        finished or aborted), so that no work of finished requests outlives a run."""
        while self._pending:
            self._resolve_oldest()

    def _resolve_oldest(self) -> StepResult:
        out, launched, counts = self._pending[0]
        sampled = launched.tokens()  # may raise (an interrupt while waiting): the step stays pending
        self._pending.pop(0)
        result = self._resolve(out, sampled, counts)
        self._attach_logprobs(out, result.changed, *launched.logprobs())
        return result

    @staticmethod
    def _attach_logprobs(out: SchedulerOutput, changed: list[Request], sample: dict, prompt: dict) -> None:
        """Give requests the log-probabilities of the tokens they kept and of the prompt tokens their
        prefill chunks scored (a chunk recomputed after preemption adds nothing twice)."""
        for req in changed:
            entry = sample.get(req.request_id)
            if entry is not None:
                req.output_logprobs.append(entry)
        for s in out.scheduled:
            run = prompt.get(s.request.request_id)
            if run is None:
                continue
            first, entries = run
            need = len(s.request.prompt_logprobs) + 1  # the next prompt token without its entry
            if first <= need < first + len(entries):
                s.request.prompt_logprobs.extend(entries[need - first:])

    def _needs_tokens_first(self) -> bool:
        """Penalties and grammars read the tokens generated so far: with one in flight, read it first."""
        return any(r.num_inflight_tokens and (r.sampling_params.penalizes_output or r.structured is not None)
                   for r in self.scheduler.running)

    def _resolve(self, out: SchedulerOutput, sampled: dict[str, int], counts: StepPageCounts) -> StepResult:
        """Hand a launched step's sampled tokens to their requests. A request's own page counts
        grow only with the steps whose token it keeps (not the one launched after it stopped)."""
        changed = self.scheduler.resolve(out, sampled)
        if counts.stored is not None:
            counts = counts.resolved()
            self._count_decode_pages(counts)
        kept = {id(r) for r in changed}
        for s, read, dense in zip(out.scheduled, counts.read, counts.dense):  # decode rows come first
            if id(s.request) in kept:
                s.request.decode_pages_read += read
                s.request.decode_pages_dense += dense
        self.num_generation_tokens += len(changed)
        finished = [r for r in changed if r.is_finished]
        return StepResult(changed, finished)

    def _count_decode_pages(self, counts: StepPageCounts) -> None:
        if not counts.read:
            return
        self.num_decode_steps += 1
        self.decode_pages_read += sum(counts.read)
        self.decode_pages_dense += sum(counts.dense)
        self.last_decode_pages_read_fraction = sum(counts.read) / max(sum(counts.dense), 1)
