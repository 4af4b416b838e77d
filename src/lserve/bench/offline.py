"""Offline speed of engine configurations side by side: prefill latency, TPOT, throughput, KV memory.

Each case is one static batch of `batch_size` random-token prompts of exactly `input_len` tokens,
generating exactly `output_len` tokens greedily (`ignore_eos`), driven through the engine's own
step loop (continuous batching, chunked prefill), the way `LLM.generate` runs it.

Definitions (all measured on the host around `LLMEngine.step`, which returns after the step's
tokens are on the CPU, so GPU work is finished):
- prefill latency: from adding the batch until every request has its first token;
- TTFT: per request, from adding the batch to its first token (mean over the batch);
- TPOT: (end - prefill latency) / (output_len - 1): the decode steps after the first token;
- throughput: output tokens / total time (and input + output tokens / total time);
- KV memory per sequence: what one sequence of the case holds at its longest (input + output - 1
  tokens; the last sampled token never enters the cache), by the engine's own accounting
  (`EngineCore.kv_bytes_per_sequence`): its paged-pool pages (dense heads only when there are
  streaming heads; key statistics included with page selection), page rounding included, plus
  its constant ring block when there are streaming heads. The peak of `EngineStats.kv_pages_used`
  is reported beside it (`kv_pages_peak`, paged pool, whole batch) as a measured cross-check;
- pages-read fraction: decode KV pages read / pages a dense decode would read, from the engine's
  counters over the timed case (`EngineStats.decode_pages_read` and `decode_pages_dense`);
- peak GPU memory: the most memory torch's allocator held during the timed case
  (`torch.cuda.max_memory_allocated`: weights, the preallocated KV cache and the largest
  activations; a GPU only).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from lserve.eval.options import ConfigSpec
from lserve.eval.runner import CONFIG_ERRORS, free_memory, one_line


@dataclass(frozen=True)
class Case:
    input_len: int
    output_len: int
    batch_size: int

    @property
    def label(self) -> str:
        return f"in {self.input_len}, out {self.output_len}, batch {self.batch_size}"


@dataclass
class CaseResult:
    """One configuration on one case; times in seconds, memory in bytes."""

    config: str
    input_len: int
    output_len: int
    batch_size: int
    status: str = "ok"
    error: str | None = None
    prefill_latency_s: float | None = None
    ttft_mean_s: float | None = None
    decode_time_s: float | None = None
    tpot_s: float | None = None
    total_time_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    output_tok_s: float | None = None
    total_tok_s: float | None = None
    kv_pages_peak: int | None = None
    kv_bytes_per_seq: int | None = None
    kv_bytes_per_seq_full: int | None = None
    """What a contiguous dense cache needs for input + output tokens (no paging, no sparsity)."""
    decode_pages_read_fraction: float | None = None
    peak_gpu_memory_bytes: int | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    """Against the first configuration: speedups (>1 = faster) and the KV memory ratio (<1 = smaller)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_prompts(vocab_size: int, case: Case, seed: int) -> list[list[int]]:
    """`batch_size` prompts of exactly `input_len` random token ids (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (case.batch_size, case.input_len), generator=gen).tolist()


def run_case(llm: Any, case: Case, seed: int) -> dict[str, Any]:
    """Time one static batch through the engine's step loop; returns the measured fields."""
    import torch

    from lserve.sampling_params import SamplingParams

    engine = llm.llm_engine
    prompts = random_prompts(engine.core.arch.vocab_size, case, seed)
    params = SamplingParams(temperature=0.0, max_tokens=case.output_len, ignore_eos=True)
    before = engine.get_stats()
    first: dict[str, float] = {}
    peak_pages = 0
    all_first: float | None = None
    ids: list[str] = []
    cuda = engine.core.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(engine.core.device)
    start = time.perf_counter()
    try:
        for prompt in prompts:
            ids.append(engine.add_request(prompt, params))
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                first.setdefault(out.request_id, now)
            if all_first is None and len(first) == case.batch_size:
                all_first = now
            peak_pages = max(peak_pages, engine.get_stats().kv_pages_used)
    except BaseException:
        for request_id in ids:  # leave the engine clean for the next case
            engine.abort_request(request_id)
        raise
    end = time.perf_counter()
    after = engine.get_stats()
    assert all_first is not None
    n_in, n_out, batch = case.input_len, case.output_len, case.batch_size
    decode = end - all_first
    dense = after.decode_pages_dense - before.decode_pages_dense
    arch = engine.core.arch
    elem = engine.core.kv_tensors.shape.dtype.itemsize
    return {
        "prefill_latency_s": all_first - start,
        "ttft_mean_s": sum(t - start for t in first.values()) / len(first),
        "decode_time_s": decode,
        "tpot_s": decode / (n_out - 1) if n_out > 1 else None,
        "total_time_s": end - start,
        "prefill_tok_s": batch * n_in / (all_first - start),
        "decode_tok_s": batch * (n_out - 1) / decode if n_out > 1 and decode > 0 else None,
        "output_tok_s": batch * n_out / (end - start),
        "total_tok_s": batch * (n_in + n_out) / (end - start),
        "kv_pages_peak": peak_pages,
        "kv_bytes_per_seq": engine.core.kv_bytes_per_sequence(n_in + n_out - 1),
        "kv_bytes_per_seq_full": (n_in + n_out) * arch.kv_bytes_per_token * elem,
        "decode_pages_read_fraction": (after.decode_pages_read - before.decode_pages_read) / dense if dense else None,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(engine.core.device) if cuda else None,
    }


def warmup_case(case: Case) -> Case:
    """The case's own prompts with fewer output tokens: compiles every kernel, captures every
    decode CUDA graph the timed run will replay (page selection has a graph per mode, and a
    short prompt that fits the token budget never reaches the selecting ones) and warms the
    allocators. 16 steps cover a selection and its reuse for intervals up to 15."""
    return Case(case.input_len, min(case.output_len, 16), case.batch_size)


def bench_config(
    spec: ConfigSpec, base_kwargs: dict[str, Any], cases: list[Case], seed: int, num_warmups: int
) -> list[CaseResult]:
    """Build one configuration's engine, run every case (after warm-up), free the engine."""
    from lserve.engine.llm import LLM

    results = [CaseResult(spec.name, c.input_len, c.output_len, c.batch_size) for c in cases]
    llm = None
    try:
        llm = LLM(**{**base_kwargs, **spec.overrides})
        for case, result in zip(cases, results):
            try:
                for i in range(num_warmups):
                    run_case(llm, warmup_case(case), seed + 1000 + i)
                for key, value in run_case(llm, case, seed).items():
                    setattr(result, key, value)
            except CONFIG_ERRORS as exc:
                result.status, result.error = "failed", one_line(exc)
    except CONFIG_ERRORS as exc:
        for result in results:
            if result.status == "ok" and result.prefill_latency_s is None:
                result.status, result.error = "failed", one_line(exc)
    finally:
        llm = None
        free_memory()
    return results


def add_ratios(results: list[CaseResult]) -> None:
    """Compare every configuration with the first one on the same case."""
    base: dict[tuple[int, int, int], CaseResult] = {}
    for r in results:
        key = (r.input_len, r.output_len, r.batch_size)
        ref = base.setdefault(key, r)
        if r is ref or r.status != "ok" or ref.status != "ok":
            continue
        r.ratios = {
            "prefill_speedup": ratio(ref.prefill_latency_s, r.prefill_latency_s),
            "tpot_speedup": ratio(ref.tpot_s, r.tpot_s),
            "throughput_ratio": ratio(r.output_tok_s, ref.output_tok_s),
            "kv_memory_ratio": ratio(r.kv_bytes_per_seq, ref.kv_bytes_per_seq),
        }


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing (or den is 0)."""
    return num / den if num is not None and den else None


def format_results(results: list[CaseResult]) -> str:
    """A Markdown table: one row per (case, configuration), ratios against the first configuration."""
    head = ["input", "output", "batch", "config", "prefill ms", "TTFT ms", "TPOT ms", "out tok/s", "total tok/s",
            "KV MiB/seq", "pages read", "prefill x", "TPOT x", "KV ratio"]
    peak = any(r.peak_gpu_memory_bytes is not None for r in results)
    if peak:
        head.append("peak GiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cases = list(dict.fromkeys((r.input_len, r.output_len, r.batch_size) for r in results))
    for r in sorted(results, key=lambda r: cases.index((r.input_len, r.output_len, r.batch_size))):  # stable
        case = [str(r.input_len), str(r.output_len), str(r.batch_size), r.config]
        if r.status != "ok":
            lines.append("| " + " | ".join(case + ["failed"] + ["-"] * (len(head) - 5)) + " |")
            continue
        cells = [
            format_number(r.prefill_latency_s, 1000, 1), format_number(r.ttft_mean_s, 1000, 1), format_number(r.tpot_s, 1000, 2),
            format_number(r.output_tok_s, 1, 1), format_number(r.total_tok_s, 1, 1), format_number(r.kv_bytes_per_seq, 2**-20, 1),
            format_number(r.decode_pages_read_fraction, 1, 3),
            format_number(r.ratios.get("prefill_speedup"), 1, 2), format_number(r.ratios.get("tpot_speedup"), 1, 2),
            format_number(r.ratios.get("kv_memory_ratio"), 1, 3),
        ] + ([format_number(r.peak_gpu_memory_bytes, 2**-30, 1)] if peak else [])
        lines.append("| " + " | ".join(case + cells) + " |")
    return "\n".join(lines)


def format_number(value: float | None, scale: float, digits: int) -> str:
    """value x scale with `digits` decimals, or "-" when missing."""
    return "-" if value is None else f"{value * scale:.{digits}f}"
