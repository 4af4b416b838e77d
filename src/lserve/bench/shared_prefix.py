"""A shared-prefix workload for `lserve bench`: requests that share one long document.

Every request is `shared_prefix_len` tokens of one random document followed by `input_len`
random tokens of its own (the question), generating `output_len` tokens greedily (`ignore_eos`).
The requests arrive one after another, each once the previous one has finished, as the
questions of one user about one document do; so with `enable_prefix_caching` every request after
the first can reuse the document's pages.

Measured per configuration (host clock around `LLMEngine.step`, which returns after the step's
tokens are on the CPU):
- TTFT of request 1 (cold) and the median TTFT of requests 2..N, and their ratio;
- the total time of the N requests;
- the prompt tokens served from the cache (`RequestOutput.num_cached_tokens`, summed) and the hit
  rate (`prefix_cache_hits / prefix_cache_queries` over the timed requests);
- whether each configuration's outputs equal the first configuration's (greedy; with random
  weights in bf16 a different chunking can change a near-tied token, so this is reported, not
  asserted).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lserve.bench.offline import format_number, ratio
from lserve.eval.options import ConfigSpec
from lserve.eval.runner import CONFIG_ERRORS, free_memory, one_line


@dataclass(frozen=True)
class Workload:
    prefix_len: int
    question_len: int
    output_len: int
    num_requests: int

    def prompts(self, vocab_size: int, seed: int) -> list[list[int]]:
        """One shared random document, then a random question per request (seeded)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        doc = torch.randint(0, vocab_size, (self.prefix_len,), generator=gen).tolist()
        questions = torch.randint(0, vocab_size, (self.num_requests, self.question_len), generator=gen).tolist()
        return [doc + q for q in questions]


@dataclass
class PrefixResult:
    """One configuration on the workload; times in seconds."""

    config: str
    status: str = "ok"
    error: str | None = None
    ttft_first_s: float | None = None
    ttft_rest_median_s: float | None = None
    ttft_ratio: float | None = None
    total_time_s: float | None = None
    cached_tokens: int | None = None
    hit_rate: float | None = None
    outputs_equal_first: bool | None = None
    ttfts_s: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("outputs")
        return out


def run_sequential(llm: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Run the prompts one after another; TTFTs, total time, outputs and cache counters."""
    from lserve.sampling_params import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    before = engine.get_stats()
    ttfts: list[float] = []
    outputs: list[list[int]] = []
    cached = 0
    start = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        rid = engine.add_request(prompt, params)
        first = None
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    if first is None and out.outputs[0].token_ids:
                        first = time.perf_counter() - t0
                    if out.finished:
                        outputs.append(list(out.outputs[0].token_ids))
                        cached += out.num_cached_tokens or 0
        except BaseException:
            engine.abort_request(rid)
            raise
        assert first is not None, "the request finished without a token"
        ttfts.append(first)
    total = time.perf_counter() - start
    after = engine.get_stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    return {
        "ttfts_s": ttfts,
        "ttft_first_s": ttfts[0],
        "ttft_rest_median_s": statistics.median(ttfts[1:]) if len(ttfts) > 1 else None,
        "total_time_s": total,
        "cached_tokens": cached,
        "hit_rate": (after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0,
        "outputs": outputs,
    }


def bench_shared_prefix(
    specs: list[ConfigSpec], base_kwargs: dict[str, Any], work: Workload, seed: int, num_warmups: int,
    on_result: Callable[[PrefixResult], None] | None = None,
) -> list[PrefixResult]:
    """Each configuration's engine runs the workload (after warm-ups on another document);
    `on_result` sees each configuration's result as soon as it is measured."""
    from lserve.engine.llm import LLM

    results = []
    for spec in specs:
        result = PrefixResult(spec.name)
        llm = None
        try:
            llm = LLM(**{**base_kwargs, **spec.overrides})
            vocab = llm.llm_engine.core.arch.vocab_size
            warm = Workload(work.prefix_len, work.question_len, min(work.output_len, 16), 2)
            for i in range(num_warmups):  # another document: compiles, captures graphs, exercises a hit
                run_sequential(llm, warm.prompts(vocab, seed + 1000 + i), warm.output_len)
            for key, value in run_sequential(llm, work.prompts(vocab, seed), work.output_len).items():
                setattr(result, key, value)
            result.ttft_ratio = ratio(result.ttft_rest_median_s, result.ttft_first_s)
        except CONFIG_ERRORS as exc:
            result.status, result.error = "failed", one_line(exc)
        finally:
            llm = None
            free_memory()
        results.append(result)
        if on_result is not None:
            on_result(result)
    ok = [r for r in results if r.status == "ok"]
    for r in ok[1:]:
        r.outputs_equal_first = r.outputs == ok[0].outputs
    return results


def format_prefix_results(results: list[PrefixResult]) -> str:
    """A Markdown table, one row per configuration; the total-time ratio is against the first."""
    head = ["config", "TTFT req 1 (s)", "TTFT req 2..N median (s)", "ratio", "total (s)", "total x",
            "cached tokens", "hit rate", "outputs = first"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = next((r for r in results if r.status == "ok"), None)
    for r in results:
        if r.status != "ok":
            lines.append("| " + " | ".join([r.config, "failed"] + ["-"] * (len(head) - 2)) + " |")
            continue
        speed = ratio(ref.total_time_s, r.total_time_s) if ref else None
        equal = "-" if r.outputs_equal_first is None else ("yes" if r.outputs_equal_first else "no")
        cells = [r.config, format_number(r.ttft_first_s, 1, 3), format_number(r.ttft_rest_median_s, 1, 3),
                 format_number(r.ttft_ratio, 1, 3), format_number(r.total_time_s, 1, 2), format_number(speed, 1, 2),
                 f"{r.cached_tokens:,}", format_number(r.hit_rate, 1, 3), equal]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

