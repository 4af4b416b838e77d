"""`lserve calibrate --selection`: choose the page score of page selection for a model.

Each candidate score (`lserve.sparse.selection`: quest, midrange, rope_channels,
label_channels) is measured two ways against exact attention:
- recall: the share of the true attention that falls on the pages it selects at the token
  budget, on calibration text (`lserve.calibration.selection_recall`, the engine's own scores);
- answers: passkey retrieval and needle-in-a-haystack (`lserve eval`'s tasks) through the
  engine with page selection on, against dense, on seeded prompts (not those of `lserve eval`,
  whose default seed is 0), alone and with the pattern's streaming heads (at
  `streaming_sparsity`, with the windows the pattern was made for).

The candidate that keeps the most answers (both tasks and settings together) wins; ties go to
the earlier of `PREFERENCE` (no calibration to go stale first; `rope_mass` before the plain RoPE
channels, for its needle-in-a-haystack answers on the default model, docs/accuracy.md). Recall is recorded beside, not used: on the default model
it ranks label channels and Quest's bound first while they lose answers, because averaged
recall hides the few copy heads whose misses lose them (docs/sparsity.md). Label channels are
calibrated on the same text first (DoubleSparsity's choice of channels,
`calibrate_label_channels`). The candidates are measured at the engine's default re-selection
interval (LServe's 4 decode steps); the chosen score is then measured at the other `intervals`
too, and the interval that keeps the most answers (ties: the longest, the cheapest) is written as
the pattern's `selector_interval`: on the default model, reusing a selection for 4 steps loses
needle-in-a-haystack answers that re-selecting every step keeps (docs/accuracy.md). At that
interval the score is measured with each local window (`local_tokens`), and then with the
chosen window at each KV page size (`page_sizes`; ties: the larger pages, fewer to rank): on the
default model 16-token pages keep passkeys with streaming heads that 64-token pages lose. A RoPE
channel score is last measured with each of `channel_counts` channels (default: its r and twice
that) in the model's dtype and, with `fp8_labels`, with twice each count in FP8 labels (about the
same bytes); ties go to the fewest label bytes: on the default model 32 channels keep RULER
answers that 16 lose (docs/accuracy.md). The choice,
the channels and every measurement go into the pattern file's `selection` object; the engine's
`page_score="auto"` takes them from there.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from lserve.calibration import selection_recall as sr
from lserve.calibration.data import make_dataset
from lserve.config import DEFAULT_PAGE_SIZE, check_page_size
from lserve.errors import LServeError
from lserve.sparse.patterns import (
    STREAMING_NOT_CALIBRATED,
    HeadPattern,
    load_pattern,
    save_pattern,
    shipped_pattern,
)
from lserve.sparse.selection import (
    CHANNEL_SCORES,
    DEFAULT_CHANNELS,
    DEFAULT_SELECTOR_INTERVAL,
    STATISTICS_SCORES,
    local_window_fits,
    rope_slow_channels,
)

logger = logging.getLogger(__name__)

CANDIDATES = (*STATISTICS_SCORES, *CHANNEL_SCORES)
PREFERENCE = ("rope_mass", "rope_channels", "label_channels", "midrange", "quest")
"""Ties between candidates that keep as many answers go to the earliest here."""


@dataclass(frozen=True)
class SelectionCalibrationConfig:
    """What `calibrate_selection` measures and where it writes."""

    output: str
    """Folder for `<model>.json` (the pattern with its `selection` object)."""
    model: str | None = None
    load_format: str = "auto"
    pattern: str | None = None
    """The head pattern to add the choice to (default: the one shipped for the model, else all dense)."""
    token_budget: int = 512
    score_channels: int | None = None
    """r of the channel scores (default: each score's own, `DEFAULT_CHANNELS`)."""
    lengths: tuple[int, ...] = (2048, 4096, 6144)
    num_samples: int = 4
    """Passkey prompts per length, and needle-in-a-haystack prompts per (length, depth)."""
    niah_depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Needle depths of the haystack prompts (none: passkey only)."""
    streaming_sparsity: float = 0.5
    """Answers are also measured with this share of streaming heads (0: only without)."""
    calib_tokens: int = 3000
    calib_queries: int = 256
    """Last positions of the calibration text whose queries are measured (and calibrate the labels)."""
    seed: int = 1234
    device: str = "auto"
    dtype: str = "auto"
    candidates: tuple[str, ...] = CANDIDATES
    intervals: tuple[int, ...] = (DEFAULT_SELECTOR_INTERVAL, 1)
    """Re-selection intervals: the candidates are measured at the first, the chosen score at every one."""
    local_tokens: tuple[int, ...] = (0, 128)
    """Local windows (`selection_local_tokens`) the chosen score is measured with at its chosen
    interval (0: none, as every other run); the one keeping the most answers is written."""
    page_sizes: tuple[int, ...] = (DEFAULT_PAGE_SIZE, 16)
    """KV page sizes: every run before uses the first; the chosen score, interval and window are
    then measured at each, and the one keeping the most answers is written as `page_size`."""
    channel_counts: tuple[int, ...] | None = None
    """Channel counts (r) a chosen RoPE channel score is measured with last (default: its r and
    twice that, within the head dimension); the one keeping the most answers is written."""
    fp8_labels: bool = True
    """Also measure FP8 labels (`label_dtype="fp8"`) at twice each of the channel counts."""

    def __post_init__(self) -> None:
        bad = [c for c in self.candidates if c not in CANDIDATES]
        if bad or not self.candidates:
            raise ValueError(f"candidates must be among {', '.join(CANDIDATES)}, got {list(self.candidates)}")
        if not 0.0 <= self.streaming_sparsity < 1.0:
            raise ValueError(f"streaming_sparsity must be in [0, 1), got {self.streaming_sparsity}")
        for name in ("token_budget", "num_samples", "calib_tokens", "calib_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.intervals or min(self.intervals) < 1 or len(set(self.intervals)) != len(self.intervals):
            raise ValueError(f"intervals must be distinct step counts >= 1, got {list(self.intervals)}")
        if not self.page_sizes or len(set(self.page_sizes)) != len(self.page_sizes):
            raise ValueError(f"page_sizes must be distinct, got {list(self.page_sizes)}")
        for page in self.page_sizes:
            check_page_size(page)
            roomy = [n for n in self.local_tokens
                     if n < 0 or (n and not local_window_fits(n, self.token_budget, page))]
            if not self.local_tokens or roomy or len(set(self.local_tokens)) != len(self.local_tokens):
                raise ValueError(f"local_tokens must be distinct token counts >= 0 that leave token_budget="
                                 f"{self.token_budget} at least one page of {page} tokens for the score beside the "
                                 f"first, the local and the newest pages, got {list(self.local_tokens)}")
        counts = self.channel_counts
        if counts is not None and (not counts or len(set(counts)) != len(counts)
                                   or any(r < 2 or r & (r - 1) for r in counts)):
            raise ValueError(f"channel_counts must be distinct powers of two >= 2, got {list(counts)}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive token counts, got {list(self.lengths)}")


@dataclass(frozen=True)
class SelectionResult:
    pattern_path: Path
    selection: dict[str, Any]
    wall_time_s: float


def _engine_kwargs(cfg: SelectionCalibrationConfig) -> dict[str, Any]:
    return dict(model=cfg.model, load_format=cfg.load_format, device=cfg.device, dtype=cfg.dtype,
                max_model_len=max(cfg.lengths) + 64, max_num_seqs=16)


def _base_pattern(cfg: SelectionCalibrationConfig, source_name: str, num_layers: int, num_kv_heads: int) -> HeadPattern:
    path = cfg.pattern or shipped_pattern(source_name)
    if path is None:
        return HeadPattern(torch.ones(num_layers, num_kv_heads), {"model": source_name, "note": "all heads dense",
                                                                  "streaming_heads": STREAMING_NOT_CALIBRATED})
    pattern = load_pattern(path)
    pattern.check_model(num_layers, num_kv_heads)
    return pattern


def measure_recall(llm: Any, cfg: SelectionCalibrationConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Label channels calibrated on the calibration text, and each candidate's (and the
    oracle's) mean recall there at the token budget."""
    core = llm.llm_engine.core
    tok = llm.get_tokenizer()
    tokens = min(cfg.calib_tokens, core.arch.max_position_embeddings)
    sample = make_dataset(tok, [tokens], num_passkeys=2, passkey_length=4, seed=cfg.seed)[0]
    ids = torch.tensor(sample.input_ids)
    captures = sr.capture(core.model, ids.to(core.device), min(cfg.calib_queries, len(ids)))
    labels = sr.calibrate_label_channels(captures, cfg.score_channels or DEFAULT_CHANNELS["label_channels"])
    channels = {"label_channels": labels}
    for kind in ("rope_channels", "rope_mass"):
        rope = torch.tensor(rope_slow_channels(core.model.rotary.inv_freq.cpu(),
                                               cfg.score_channels or DEFAULT_CHANNELS[kind]))
        channels[kind] = rope.expand(labels.shape[0], labels.shape[1], -1)
    queries = list(range(0, captures[0].num_queries, max(1, captures[0].num_queries // 16)))
    recalls = {}
    for kind in (*cfg.candidates, "oracle"):
        per_head = sr.recall(captures, kind, [cfg.token_budget], queries, page_size=core.config.cache.page_size,
                             logical=core.config.sparse.logical_page_size, channels=channels.get(kind))
        recalls[kind] = round(float(per_head[cfg.token_budget].mean()), 4)
    return labels, recalls


def streaming_settings(cfg: SelectionCalibrationConfig, pattern: HeadPattern, pattern_path: Path) -> dict[str, Any]:
    """Engine settings of the pattern's streaming heads: `streaming_sparsity` and the windows the
    pattern was calibrated with (its metadata's sink/local), in prefill and decode."""
    sink = int(pattern.metadata.get("sink", pattern.metadata.get("sink_size", 64)))
    local = int(pattern.metadata.get("local", pattern.metadata.get("recent_size", 512)))
    return dict(streaming_sparsity=cfg.streaming_sparsity, attn_pattern=str(pattern_path),
                prefill_sink_tokens=sink, decode_sink_tokens=sink, prefill_local_tokens=local,
                decode_local_tokens=local)


def measure_answers(cfg: SelectionCalibrationConfig, tok: Any, pattern: HeadPattern, pattern_path: Path,
                    runs: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, int]]:
    """Answers kept (passkey and needle-in-a-haystack together), per setting ("alone", and
    "streaming" with the pattern's streaming heads), by each of `runs` (name -> engine settings;
    default: dense decode, named "dense", and page selection with each candidate score at the
    first of `intervals`)."""
    from lserve.engine.llm import LLM
    from lserve.eval.niah import make_niah_samples
    from lserve.eval.passkey import make_passkey_samples
    from lserve.eval.runner import free_memory, run_with_llm
    from lserve.eval.sample import PromptFormat
    from lserve.eval.scoring import score

    fmt = PromptFormat(tok)
    samples = make_passkey_samples(fmt, list(cfg.lengths), cfg.num_samples, seed=cfg.seed)
    if cfg.niah_depths:
        samples += make_niah_samples(fmt, list(cfg.lengths), list(cfg.niah_depths), cfg.num_samples, seed=cfg.seed)
    settings: dict[str, dict[str, Any]] = {"alone": dict(attn_pattern=str(pattern_path))}
    if cfg.streaming_sparsity > 0 and pattern.calibrated_for_streaming:  # (else no heads are known to stream)
        settings["streaming"] = streaming_settings(cfg, pattern, pattern_path)
    if runs is None:
        runs = {"dense": {}, **{name: selection_settings(cfg, name, cfg.intervals[0]) for name in cfg.candidates}}
    answers: dict[str, dict[str, int]] = {}
    for setting, base in settings.items():
        answers[setting] = {}
        for name, extra in runs.items():
            llm = LLM(**_engine_kwargs(cfg), **base, **extra)
            outputs = run_with_llm(llm, samples, f"answers {setting} {name}")
            answers[setting][name] = int(sum(score(s.scorer, o, s.answers) for s, o in zip(samples, outputs)))
            llm = None
            free_memory()
    return answers


V = TypeVar("V", int, tuple[int, str])
"""The values of one swept setting."""

LabelFormat = tuple[int, str]
"""A channel score's labels: (channels, `label_dtype`)."""


def selection_settings(cfg: SelectionCalibrationConfig, score: str, interval: int, local: int = 0,
                       page_size: int | None = None, labels: LabelFormat | None = None) -> dict[str, Any]:
    """Engine settings of page selection with `score` (with `labels`, default `score_channels`
    in the model's dtype), re-selected every `interval` steps, with a local window of `local`
    tokens, on KV pages of `page_size` tokens (default: the first of `page_sizes`)."""
    channels, dtype = labels or (None, "auto")
    return dict(token_budget=cfg.token_budget, page_score=score, score_channels=channels or cfg.score_channels,
                label_dtype=dtype, selector_interval=interval, selection_local_tokens=local,
                page_size=page_size or cfg.page_sizes[0])


def _sweep(cfg: SelectionCalibrationConfig, values: tuple[V, ...], name: Callable[[V], str],
           settings: Callable[[V], dict[str, Any]], known: V, known_kept: dict[str, int],
           prefer: Callable[[V], int], tok: Any, pattern: HeadPattern,
           pattern_path: Path) -> tuple[V, dict[str, dict[str, int]]]:
    """Answers (per setting, "alone"/"streaming") of the chosen score with each of `values` of one
    engine setting, each run as `settings(v)` and named `name(v)`, except `known`, whose answers
    are already measured (`known_kept`, per setting) and are taken where it is among `values`;
    and the value that keeps the most over every setting (ties: the largest `prefer(v)`)."""
    runs = {name(v): settings(v) for v in values if v != known}
    by_value = measure_answers(cfg, tok, pattern, pattern_path, runs) if runs else {s: {} for s in known_kept}
    if known in values:
        for setting, kept in known_kept.items():
            by_value[setting] = {name(known): kept, **by_value[setting]}
    best = max(values, key=lambda v: (sum(a[name(v)] for a in by_value.values()), prefer(v)))
    return best, by_value


def choose_interval(cfg: SelectionCalibrationConfig, chosen: str, answers: dict[str, dict[str, int]],
                    tok: Any, pattern: HeadPattern, pattern_path: Path) -> tuple[int, dict[str, dict[str, int]]]:
    """The chosen score's answers at each of `intervals` (the first's from `answers`), and the
    interval that keeps the most (ties: the longest)."""
    return _sweep(cfg, cfg.intervals, lambda i: f"every {i}", lambda i: selection_settings(cfg, chosen, i),
                  cfg.intervals[0], {s: kept[chosen] for s, kept in answers.items()}, lambda i: i,
                  tok, pattern, pattern_path)


def choose_local(cfg: SelectionCalibrationConfig, chosen: str, interval: int, by_interval: dict[str, dict[str, int]],
                 tok: Any, pattern: HeadPattern, pattern_path: Path) -> tuple[int, dict[str, dict[str, int]]]:
    """The chosen score's answers at its interval with each of `local_tokens` (no window's from
    `by_interval`), and the window that keeps the most (ties: the smallest)."""
    return _sweep(cfg, cfg.local_tokens, lambda n: f"local {n}", lambda n: selection_settings(cfg, chosen, interval, n),
                  0, {s: kept[f"every {interval}"] for s, kept in by_interval.items()}, lambda n: -n,
                  tok, pattern, pattern_path)


def choose_page_size(cfg: SelectionCalibrationConfig, chosen: str, interval: int, local: int,
                     by_local: dict[str, dict[str, int]], tok: Any, pattern: HeadPattern,
                     pattern_path: Path) -> tuple[int, dict[str, dict[str, int]]]:
    """The chosen score's answers at its interval and window on each of `page_sizes` (the
    first's from `by_local`), and the page size that keeps the most (ties: the largest)."""
    return _sweep(cfg, cfg.page_sizes, lambda p: f"pages of {p}",
                  lambda p: selection_settings(cfg, chosen, interval, local, p), cfg.page_sizes[0],
                  {s: kept[f"local {local}"] for s, kept in by_local.items()}, lambda p: p, tok, pattern, pattern_path)


def channel_counts(cfg: SelectionCalibrationConfig, chosen: str, head_dim: int) -> tuple[int, ...]:
    """The channel counts the chosen score is measured with: its own r first, then the others of
    `channel_counts` (default: twice r, if the head has that many channels); none but r for
    scores whose labels are not RoPE channels (Quest's and midrange's statistics, label channels
    calibrated at one r)."""
    first = cfg.score_channels or DEFAULT_CHANNELS.get(chosen, DEFAULT_CHANNELS["label_channels"])
    if chosen not in ("rope_channels", "rope_mass"):
        return (first,)
    wanted = cfg.channel_counts if cfg.channel_counts is not None else (first, 2 * first)
    return (first, *[r for r in wanted if r != first and r <= head_dim])


def label_formats(cfg: SelectionCalibrationConfig, chosen: str, head_dim: int) -> tuple[LabelFormat, ...]:
    """The labels the chosen score is measured with: each of `channel_counts` in the model's
    dtype (its own r first), then, with `fp8_labels` and for RoPE channel scores, twice each count
    in FP8 (about the same bytes; within the head dimension)."""
    counts = channel_counts(cfg, chosen, head_dim)
    fp8 = [(2 * r, "fp8") for r in counts if 2 * r <= head_dim] \
        if cfg.fp8_labels and chosen in ("rope_channels", "rope_mass") else []
    return (*[(r, "auto") for r in counts], *dict.fromkeys(fp8))


def label_bytes(labels: LabelFormat) -> int:
    """Bytes per token and KV head of `labels` served in bfloat16: 2r, or r + a float32 scale in FP8."""
    channels, dtype = labels
    return channels + 4 if dtype == "fp8" else 2 * channels


def label_name(labels: LabelFormat) -> str:
    channels, dtype = labels
    return f"{channels} FP8 channels" if dtype == "fp8" else f"{channels} channels"


def choose_labels(cfg: SelectionCalibrationConfig, chosen: str, formats: tuple[LabelFormat, ...], interval: int,
                  local: int, page_size: int, by_page: dict[str, dict[str, int]], tok: Any, pattern: HeadPattern,
                  pattern_path: Path) -> tuple[LabelFormat, dict[str, dict[str, int]]]:
    """The chosen score's answers at its interval, window and page size with each of `formats`
    (the first's from `by_page`), and the one that keeps the most (ties: the fewest label bytes)."""
    return _sweep(cfg, formats, label_name,
                  lambda f: selection_settings(cfg, chosen, interval, local, page_size, f), formats[0],
                  {s: kept[f"pages of {page_size}"] for s, kept in by_page.items()}, lambda f: -label_bytes(f),
                  tok, pattern, pattern_path)


def choose(candidates: tuple[str, ...], answers: dict[str, dict[str, int]]) -> str:
    """Most answers kept over every setting; ties to the earliest in `PREFERENCE`."""
    return max(candidates, key=lambda c: (sum(a[c] for a in answers.values()), -PREFERENCE.index(c)))


def calibrate_selection(cfg: SelectionCalibrationConfig) -> SelectionResult:
    """Measure every candidate score, choose one, write the pattern with its `selection` object."""
    from lserve.engine.llm import LLM

    start = time.perf_counter()
    out = Path(cfg.output).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LServeError(f"cannot create output folder {cfg.output!r}: {exc.strerror or exc}") from exc
    llm = LLM(**_engine_kwargs(cfg))
    core = llm.llm_engine.core
    base = _base_pattern(cfg, core.source.name, core.arch.num_layers, core.arch.num_kv_heads)
    head_dim = core.arch.head_dim
    if cfg.channel_counts is not None and max(cfg.channel_counts) > head_dim:  # (before the long measurements)
        raise LServeError(f"channel counts {list(cfg.channel_counts)} exceed the model's head dimension {head_dim}")
    with torch.inference_mode():
        labels, recalls = measure_recall(llm, cfg)
    tok = llm.get_tokenizer()
    llm = None
    entry: dict[str, Any] = {"channels": labels.tolist()}
    with tempfile.TemporaryDirectory() as tmp:  # the label channels, for the engines that measure them
        probe = save_pattern(HeadPattern(base.scores, base.metadata, selection=entry), Path(tmp) / "probe.json")
        answers = measure_answers(cfg, tok, base, probe)
        chosen = choose(cfg.candidates, answers)
        interval, by_interval = choose_interval(cfg, chosen, answers, tok, base, probe)
        local, by_local = choose_local(cfg, chosen, interval, by_interval, tok, base, probe)
        page_size, by_page = choose_page_size(cfg, chosen, interval, local, by_local, tok, base, probe)
        formats = label_formats(cfg, chosen, head_dim)
        (channels, label_dtype), by_channels = choose_labels(cfg, chosen, formats, interval, local, page_size,
                                                             by_page, tok, base, probe)
    entry = {
        "page_score": chosen, "channels": labels.tolist(),
        "score_channels": channels,
        "label_dtype": label_dtype,
        "selector_interval": interval,
        "selection_local_tokens": local,
        "page_size": page_size,
        "measured": {
            "token_budget": cfg.token_budget, "recall": recalls, "answers_kept": answers,
            "answers_kept_by_interval": by_interval, "answers_kept_by_local_tokens": by_local,
            "answers_kept_by_page_size": by_page,
            "answers_kept_by_channels": by_channels,
            "samples": cfg.num_samples * len(cfg.lengths) * (1 + len(cfg.niah_depths)),
            "lengths": list(cfg.lengths), "niah_depths": list(cfg.niah_depths),
            "calibration_tokens": min(cfg.calib_tokens, core.arch.max_position_embeddings), "seed": cfg.seed,
            "device": str(core.device), "dtype": str(core.dtype).removeprefix("torch."),
        },
    }
    path = save_pattern(HeadPattern(base.scores, base.metadata, selection=entry), out / f"{core.source.name}.json")
    return SelectionResult(path, entry, time.perf_counter() - start)
