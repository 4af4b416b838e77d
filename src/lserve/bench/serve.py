"""`lserve bench --base-url`: load an OpenAI-compatible server with concurrent streaming requests.

Metrics follow vLLM's `bench serve` definitions, so numbers can be put next to published ones:
TTFT is client-side, from sending to the first streamed text; TPOT per request is
(latency - TTFT) / (output tokens - 1); ITL is every gap between streamed chunks, pooled over
requests (a chunk may hold several tokens); E2EL is the whole request. Throughputs divide token
counts by the benchmark duration. Output token counts come from the server's `usage` when it
sends one, else from re-tokenizing the text (else one token per chunk). The printed block keeps
vLLM's layout and the JSON its key names (`mean_ttft_ms`, `p99_itl_ms`, `output_throughput`, ...).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from lserve.eval.client import (
    StreamResult,
    chat_payload,
    completion_payload,
    run_requests,
)

METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass(frozen=True)
class ServeOptions:
    base_url: str
    model: str
    input_len: int
    output_len: int
    num_prompts: int
    max_concurrency: int
    request_rate: float = float("inf")
    """Requests per second (Poisson arrivals, or gamma with `burstiness`); inf = all at once."""
    burstiness: float = 1.0
    seed: int = 0
    ignore_eos: bool = True
    endpoint: str = "completions"
    """"completions" (/v1/completions) or "chat" (/v1/chat/completions)."""
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl")
    percentiles: tuple[float, ...] = (99.0,)


def random_token_prompts(
    tokenizer: Any, vocab_size: int, input_len: int, num: int, seed: int
) -> tuple[list[str | list[int]], list[int]]:
    """Random prompts of about `input_len` tokens: text decoded from random ids when a tokenizer is
    given (its re-encoded length is reported), else the token ids themselves."""
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    prompts: list[str | list[int]] = []
    lengths: list[int] = []
    for _ in range(num):
        ids = []
        while len(ids) < input_len:
            t = rng.randrange(vocab_size)
            if t not in special:
                ids.append(t)
        if tokenizer is None:
            prompts.append(ids)
            lengths.append(input_len)
            continue
        text = tokenizer.decode(ids)
        prompts.append(text)
        lengths.append(len(tokenizer.encode(text, add_special_tokens=False)))
    return prompts, lengths


def arrival_delays(num: int, rate: float, burstiness: float, seed: int) -> list[float] | None:
    """Start offsets in seconds: gamma-distributed gaps with mean 1/rate (Poisson at burstiness 1)."""
    if rate == float("inf"):
        return None
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def _percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return 0.0
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(prefix: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    out = {
        f"mean_{prefix}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{prefix}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{prefix}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    for p in percentiles:
        out[f"p{p:g}_{prefix}_ms"] = _percentile(ms, p)
    return out


def _peak_output_throughput(results: Sequence[StreamResult]) -> float:
    """Most chunks received within one second (vLLM's peak output token throughput, per chunk)."""
    times = sorted(t for r in results for t in r.chunk_times)
    if not times:
        return 0.0
    buckets: dict[int, int] = {}
    for t in times:
        second = int(t - times[0])
        buckets[second] = buckets.get(second, 0) + 1
    return float(max(buckets.values()))


def _peak_concurrency(results: Sequence[StreamResult]) -> int:
    events = sorted([(r.start, 1) for r in results] + [(r.start + r.latency, -1) for r in results if r.ok])
    peak = now = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def summarize(
    results: Sequence[StreamResult], input_lens: Sequence[int], duration: float, opts: ServeOptions,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """vLLM-named metrics from the per-request results."""
    ok = [(r, n) for r, n in zip(results, input_lens) if r.ok]
    out_lens = []
    for r, _ in ok:
        if r.completion_tokens is not None:
            out_lens.append(int(r.completion_tokens))
        elif tokenizer is not None:
            out_lens.append(len(tokenizer.encode(r.text, add_special_tokens=False)))
        else:
            out_lens.append(len(r.chunk_times))
    in_lens = [int(r.prompt_tokens) if r.prompt_tokens is not None else n for r, n in ok]
    ttfts = [r.ttft or 0.0 for r, _ in ok]
    tpots = [(r.latency - (r.ttft or 0.0)) / (n - 1) for (r, _), n in zip(ok, out_lens) if n > 1]
    itls = [gap for r, _ in ok for gap in r.itls]
    e2els = [r.latency for r, _ in ok]
    total_in, total_out = sum(in_lens), sum(out_lens)
    summary: dict[str, Any] = {
        "base_url": opts.base_url, "model_id": opts.model, "endpoint": opts.endpoint,
        "num_prompts": opts.num_prompts,
        "request_rate": opts.request_rate if math.isfinite(opts.request_rate) else "inf", "burstiness": opts.burstiness,
        "max_concurrency": opts.max_concurrency, "duration": duration, "completed": len(ok),
        "failed": len(results) - len(ok), "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
        "max_output_tokens_per_s": _peak_output_throughput([r for r, _ in ok]),
        "max_concurrent_requests": _peak_concurrency(results),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        summary.update(_stats(name, values, opts.percentiles))
    summary.update({
        "input_lens": in_lens, "output_lens": out_lens, "ttfts": ttfts, "itls": [r.itls for r, _ in ok],
        "generated_texts": [r.text for r, _ in ok], "errors": [r.error for r in results],
    })
    return summary


def format_summary(s: dict[str, Any], opts: ServeOptions) -> str:
    """The result block in vLLM's `bench serve` layout."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, digits: int | None = None) -> None:
        text = f"{value:<10.{digits}f}" if digits is not None else f"{value!s:<10}"
        lines.append(f"{label:<40} {text}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Maximum request concurrency:", s["max_concurrency"])
    row("Benchmark duration (s):", s["duration"], 2)
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"], 2)
    row("Output token throughput (tok/s):", s["output_throughput"], 2)
    row("Peak output token throughput (tok/s):", s["max_output_tokens_per_s"], 2)
    row("Peak concurrent requests:", s["max_concurrent_requests"], 2)
    row("Total token throughput (tok/s):", s["total_token_throughput"], 2)
    for metric in opts.percentile_metrics:
        title, short = METRIC_TITLES[metric]
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {short} (ms):", s[f"mean_{metric}_ms"], 2)
        row(f"Median {short} (ms):", s[f"median_{metric}_ms"], 2)
        for p in opts.percentiles:
            row(f"P{p:g} {short} (ms):", s[f"p{p:g}_{metric}_ms"], 2)
    lines.append("=" * 50)
    return "\n".join(lines)


def run_serve_bench(opts: ServeOptions, tokenizer: Any, vocab_size: int, progress: bool = True) -> dict[str, Any]:
    """Send `num_prompts` streaming requests and summarize them."""
    prompts, input_lens = random_token_prompts(tokenizer, vocab_size, opts.input_len, opts.num_prompts, opts.seed)
    extra: dict[str, Any] = {"ignore_eos": True} if opts.ignore_eos else {}
    if opts.endpoint == "chat":
        if tokenizer is None:
            raise ValueError("the chat endpoint needs text prompts; give --model a tokenizer or use completions")
        url = f"{opts.base_url}/v1/chat/completions"
        payloads = [chat_payload(opts.model, [{"role": "user", "content": str(p)}], opts.output_len, **extra)
                    for p in prompts]
    else:
        url = f"{opts.base_url}/v1/completions"
        payloads = [completion_payload(opts.model, p, opts.output_len, **extra) for p in prompts]
    delays = arrival_delays(opts.num_prompts, opts.request_rate, opts.burstiness, opts.seed)
    start = time.perf_counter()
    with tqdm(total=len(payloads), desc="requests", unit="req", disable=not progress) as bar:
        results = asyncio.run(run_requests(url, payloads, opts.max_concurrency, delays=delays,
                                           on_done=lambda i, r: bar.update(1)))
    duration = time.perf_counter() - start
    return summarize(results, input_lens, duration, opts, tokenizer)
