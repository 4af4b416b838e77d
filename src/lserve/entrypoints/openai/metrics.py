"""Prometheus metrics of the server: vLLM's names where the meaning is the same, `lserve:` for the rest.

Engine-wide values (queue sizes, KV cache use, token and preemption counters, sparse-attention
statistics) are read from the latest `EngineStats` snapshot when Prometheus scrapes, through a
custom collector, so they can never drift from the engine's own counters. Per-request latencies
(TTFT, inter-token, end-to-end; queue, prefill, decode and inference time from the engine's own
timestamps) and token counts are histograms observed by the engine loop as outputs arrive, and
the tokens of each engine step (`iteration_tokens_total`) as steps run.
Every series carries a `model_name` label, as in vLLM, so dashboards built for vLLM work as-is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lserve.engine.stats import EngineStats

if TYPE_CHECKING:
    from lserve.entrypoints.openai.async_engine import RequestStream
    from lserve.request import RequestOutput

# vLLM's bucket boundaries (seconds), so histograms from both engines compare bucket for bucket.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
PHASE_BUCKETS = E2E_BUCKETS
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to the context length."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


FINISH_REASONS = ("stop", "length", "abort")


class _EngineCollector(Collector):
    """Gauges and counters computed from the engine's latest statistics snapshot."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        label = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests holding KV pages (prefilling or decoding).", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting for their (next) prefill.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Used fraction of the KV cache pages (1 = full).", s.kv_cache_usage)
        yield counter("vllm:prompt_tokens", "Prompt tokens of the requests admitted.", s.num_prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", s.num_generation_tokens)
        yield counter("vllm:num_preemptions", "Requests preempted (pages freed, recomputed later).", s.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield gauge("lserve:kv_cache_pages_total", "KV cache pages in the pool.", s.kv_pages_total)
        yield gauge("lserve:kv_cache_pages_used", "KV cache pages held by requests.", s.kv_pages_used)
        yield gauge("lserve:streaming_heads_fraction",
                    "Fraction of the model's KV heads that are streaming heads (0 = static sparsity off).",
                    s.streaming_head_fraction)
        yield gauge("lserve:decode_pages_read_fraction",
                    "KV pages read by the last decode step / pages a dense decode would read (1 = dense).",
                    s.last_decode_pages_read_fraction)
        yield counter("lserve:decode_pages_read", "KV pages read by decode steps (layers x KV heads x sequences).",
                      s.decode_pages_read)
        yield counter("lserve:decode_pages_dense", "KV pages the same decode steps would read densely.",
                      s.decode_pages_dense)
        yield counter("lserve:decode_steps", "Engine steps that decoded at least one token.", s.num_decode_steps)


class ServerMetrics:
    """The server's registry: engine statistics plus per-request latency histograms."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats], max_model_len: int = 2**20) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, stats))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Time from arrival (tokenization included) to the first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between two output tokens of a request.",
                             ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Time from arrival to the last token of finished requests.", E2E_BUCKETS)

        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Time a request waited before it was first scheduled.", PHASE_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Time from first scheduled to the first token.", PHASE_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Time from the first token to the last.", PHASE_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Time from first scheduled to the last token.", PHASE_BUCKETS)
        tokens = token_buckets(max_model_len)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens of finished requests.", tokens)
        self.generation_tokens = histogram("vllm:request_generation_tokens",
                                           "Tokens generated by finished requests.", tokens)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Tokens (prompt and decode) of each engine step.",
                                          ITERATION_TOKEN_BUCKETS)
        success = Counter(
            "vllm:request_success", "Finished requests by finish reason (abort: the client left or the server stopped).",
            ["model_name", "finished_reason"], registry=self.registry,
        )
        self._finished = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}

    def tokens_arrived(self, stream: RequestStream, now: float, new_tokens: int) -> None:
        """Observe TTFT for a request's first output, the per-token gap for later ones."""
        if stream.first_token_time is None:
            self.ttft.observe(now - stream.arrival_time)
        elif stream.last_token_time is not None:
            gap = (now - stream.last_token_time) / new_tokens
            for _ in range(new_tokens):
                self.itl.observe(gap)

    def request_finished(self, reason: str, stream: RequestStream, now: float,
                         output: RequestOutput | None = None) -> None:
        """Count a finished request; a completed one (not aborted) also observes its latencies,
        phases (from the engine's timestamps in `output.metrics`) and token counts."""
        counter = self._finished.get(reason)
        if counter is not None:
            counter.inc()
        if reason == "abort":
            return
        self.e2e.observe(now - stream.arrival_time)
        if output is None:
            return
        m = output.metrics
        scheduled, first, last = m.get("first_scheduled_time"), m.get("first_token_time"), m.get("last_token_time")
        if scheduled is not None:
            self.queue_time.observe(max(scheduled - m["arrival_time"], 0.0))
            if first is not None and last is not None:
                self.prefill_time.observe(max(first - scheduled, 0.0))
                self.decode_time.observe(max(last - first, 0.0))
                self.inference_time.observe(max(last - scheduled, 0.0))
        self.prompt_tokens.observe(len(output.prompt_token_ids))
        self.generation_tokens.observe(len(output.outputs[0].token_ids))

    def step_done(self, num_tokens: int) -> None:
        """An engine step launched a batch of `num_tokens` tokens."""
        if num_tokens:
            self.iteration_tokens.observe(num_tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
