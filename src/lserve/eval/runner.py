"""Run samples through each configuration: in-process engines one after another, or OpenAI servers.

A configuration that cannot run (a setting this version does not support, a missing head
pattern, a request the engine rejects, out of memory) is recorded as failed with a one-line
reason and the next configuration runs; it never aborts the evaluation.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from lserve.errors import LServeError
from lserve.eval.client import chat_payload, completion_payload, run_requests
from lserve.eval.options import ConfigSpec
from lserve.eval.sample import Sample
from lserve.eval.scoring import score

logger = logging.getLogger(__name__)

CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    LServeError, ValueError, TypeError, NotImplementedError, RuntimeError, MemoryError,
)
"""Errors that fail one configuration (reported in one line) instead of the whole run."""


@dataclass
class ConfigResult:
    """Outputs and scores of one configuration, aligned with the sample list."""

    name: str
    overrides: dict[str, Any]
    status: str = "ok"
    """"ok" or "failed"."""
    error: str | None = None
    outputs: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    sample_errors: list[str] = field(default_factory=list)
    """Per-sample request errors (server mode); "" where the request succeeded."""
    seconds: float = 0.0
    stats: dict[str, float | None] = field(default_factory=dict)
    """Engine statistics after the run (pages-read fraction, streaming-head fraction)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def one_line(exc: BaseException) -> str:
    """`TypeName: first line of the message`."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def free_memory() -> None:
    """Return the previous engine's memory before the next one is built."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_llm(llm: Any, samples: Sequence[Sample], desc: str, progress: bool = True) -> list[str]:
    """Greedy outputs of an `LLM` for every sample, in order.

    All samples are queued at once and the engine's continuous batching runs `max_num_seqs` of
    them at a time; the progress bar moves as each one finishes.
    """
    from lserve.engine.llm import run_to_completion
    from lserve.sampling_params import SamplingParams

    engine = llm.llm_engine
    ids: list[str] = []
    try:
        for s in samples:
            params = SamplingParams(temperature=0.0, max_tokens=s.max_tokens)
            ids.append(engine.add_request(list(s.prompt_ids), params))
    except BaseException:
        for request_id in ids:
            engine.abort_request(request_id)
        raise
    with tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress) as bar:
        return [out.outputs[0].text for out in run_to_completion(engine, ids, bar)]


def engine_stats(llm: Any) -> dict[str, float | None]:
    """The sparse-attention statistics worth reporting beside accuracy.

    The pages-read fraction is None when the engine counted no decode pages (it has no counters
    for that attention path yet), rather than a misleading 1.0.
    """
    stats = llm.llm_engine.get_stats()
    fraction = stats.decode_pages_read / stats.decode_pages_dense if stats.decode_pages_dense else None
    return {
        "decode_pages_read_fraction": None if fraction is None else round(fraction, 6),
        "decode_pages_read": stats.decode_pages_read,
        "decode_pages_dense": stats.decode_pages_dense,
        "streaming_head_fraction": round(stats.streaming_head_fraction, 6),
        "num_preemptions": stats.num_preemptions,
    }


def run_engine_config(
    spec: ConfigSpec, base_kwargs: dict[str, Any], samples: Sequence[Sample], progress: bool = True
) -> ConfigResult:
    """Build an `LLM` for one configuration, run every sample, score, free the engine."""
    from lserve.engine.llm import LLM

    result = ConfigResult(spec.name, dict(spec.overrides))
    start = time.perf_counter()
    llm = None
    try:
        llm = LLM(**{**base_kwargs, **spec.overrides})
        result.outputs = run_with_llm(llm, samples, spec.name, progress)
        result.stats = engine_stats(llm)
    except CONFIG_ERRORS as exc:
        logger.info("configuration %s failed", spec.name, exc_info=True)  # the traceback with -v
        result.status, result.error, result.outputs = "failed", one_line(exc), []
    finally:
        llm = None
        free_memory()
    result.seconds = round(time.perf_counter() - start, 3)
    result.scores = [score(s.scorer, o, s.answers) for s, o in zip(samples, result.outputs)]
    return result


def run_server_config(
    name: str, base_url: str, model: str, samples: Sequence[Sample], concurrency: int, progress: bool = True
) -> ConfigResult:
    """Send every sample to an OpenAI-compatible server (chat samples to /v1/chat/completions)."""
    result = ConfigResult(name, {"base_url": base_url, "served_model_name": model})
    chat = bool(samples) and samples[0].chat
    url = f"{base_url}/v1/chat/completions" if chat else f"{base_url}/v1/completions"
    payloads = [
        chat_payload(model, [{"role": "user", "content": s.user_text}], s.max_tokens) if chat
        else completion_payload(model, s.prompt_text, s.max_tokens)
        for s in samples
    ]
    start = time.perf_counter()
    with tqdm(total=len(samples), desc=name, unit="sample", disable=not progress) as bar:
        streams = asyncio.run(run_requests(url, payloads, concurrency, on_done=lambda i, r: bar.update(1)))
    result.seconds = round(time.perf_counter() - start, 3)
    result.outputs = [r.text if r.ok else "" for r in streams]
    result.sample_errors = [r.error for r in streams]
    failures = [e for e in result.sample_errors if e]
    if len(failures) == len(samples) and samples:
        result.status, result.error, result.outputs = "failed", f"every request failed; first: {failures[0]}", []
    result.scores = [score(s.scorer, o, s.answers) for s, o in zip(samples, result.outputs)]
    return result
