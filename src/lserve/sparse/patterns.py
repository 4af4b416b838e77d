"""Head patterns: which KV heads need the whole context (dense) and which can stream.

A pattern is a score in [0, 1] per (layer, KV head); higher means the head needs more context.
Two file formats load:
- DuoAttention's `full_attention_heads.tsv`: tab-separated floats, rows = layers, columns = KV
  heads, raw gate values (clipped to [0, 1]); a folder holding it (and maybe its config.json) works too;
- lserve's own JSON (`*.json`): the scores plus metadata (model, the sink/local used when the
  scores were made, how they were made) and, optionally, a `selection` object: the page score
  that `lserve calibrate --selection` chose for the model (`lserve.sparse.selection`).
`binarize` turns scores into streaming-head flags at a target sparsity by a global rank over all
heads (DuoAttention's quantile rule, with ties broken by position so the result is deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lserve.errors import LServeError

FORMAT = "lserve-head-pattern"
DUO_FILE = "full_attention_heads.tsv"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "patterns"


class PatternError(LServeError):
    """A head pattern file that cannot be used."""


STREAMING_NOT_CALIBRATED = "not calibrated"
"""The metadata's `streaming_heads` value of a pattern whose scores were not calibrated (all dense)."""


@dataclass(frozen=True)
class HeadPattern:
    scores: torch.Tensor
    """(num_layers, num_kv_heads) float32 in [0, 1]."""
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    selection: dict[str, Any] | None = None
    """The page-score choice `lserve calibrate --selection` wrote, if any (read by
    `lserve.sparse.selection.resolve_page_score`)."""

    @property
    def calibrated_for_streaming(self) -> bool:
        """False for a pattern that carries only a page-selection choice (all heads dense, as
        `lserve calibrate --selection` writes for a model without a head pattern): its equal
        scores say nothing about which heads may stream."""
        return self.metadata.get("streaming_heads") != STREAMING_NOT_CALIBRATED

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.scores.shape[0]), int(self.scores.shape[1])

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise PatternError unless the pattern has one score per layer and KV head of the model."""
        if self.shape != (num_layers, num_kv_heads):
            raise PatternError(
                f"head pattern {self.source or ''} has {self.shape[0]} layers x {self.shape[1]} KV heads, "
                f"the model has {num_layers} x {num_kv_heads}"
            )


def _parse_tsv(text: str, source: str) -> torch.Tensor:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append([float(x) for x in line.split()])
        except ValueError as exc:
            raise PatternError(f"{source}: line {n} is not a row of numbers ({exc})") from exc
    return _as_scores(rows, source)


def _as_scores(rows: Any, source: str) -> torch.Tensor:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise PatternError(f"{source}: expected a non-empty table of scores (layers x KV heads)")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise PatternError(f"{source}: rows have different lengths {sorted(widths)}")
    try:
        scores = torch.tensor(rows, dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise PatternError(f"{source}: scores must be numbers ({exc})") from exc
    if scores.ndim != 2 or scores.dtype == torch.bool:
        raise PatternError(f"{source}: expected a table of numbers (layers x KV heads)")
    if not torch.isfinite(scores).all():
        raise PatternError(f"{source}: scores must be finite numbers (found NaN or inf)")
    return scores.clamp(0.0, 1.0)  # DuoAttention's raw gates may stray slightly outside [0, 1]


def load_pattern(path: str | Path) -> HeadPattern:
    """Load a DuoAttention TSV (file or folder) or an lserve JSON pattern."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / DUO_FILE).is_file():
            return _load_duo(p / DUO_FILE)
        jsons = sorted(p.glob("*.json"))
        candidates = [j for j in jsons if j.name != "config.json"]
        if len(candidates) == 1:
            return _load_json(candidates[0])
        raise PatternError(f"no {DUO_FILE} or single lserve pattern .json in folder {p}")
    if not p.is_file():
        raise PatternError(f"head pattern {str(path)!r} does not exist")
    return _load_json(p) if p.suffix == ".json" else _load_duo(p)


def _load_duo(tsv: Path) -> HeadPattern:
    try:
        text = tsv.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PatternError(f"cannot read head pattern {tsv}: {exc}") from exc
    metadata: dict[str, Any] = {"format": "duo-attention"}
    config = tsv.parent / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
            metadata.update({k: cfg[k] for k in ("sink_size", "recent_size", "model_name") if k in cfg})
        except (OSError, json.JSONDecodeError):
            pass  # the config is informative only
    return HeadPattern(_parse_tsv(text, str(tsv)), metadata, str(tsv))


def _load_json(path: Path) -> HeadPattern:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatternError(f"cannot read head pattern {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PatternError(f"{path} is not an lserve head pattern (expected \"format\": \"{FORMAT}\")")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise PatternError(f"{path}: metadata must be an object")
    selection = data.get("selection")
    if selection is not None and not isinstance(selection, dict):
        raise PatternError(f"{path}: selection must be an object")
    return HeadPattern(_as_scores(data.get("scores"), str(path)), metadata, str(path), selection)


def save_pattern(pattern: HeadPattern, path: str | Path) -> Path:
    """Write lserve's JSON format (and a DuoAttention TSV beside it, for other tools, unless the
    heads were not calibrated: a TSV cannot say so, and a folder's TSV is read before its JSON)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "version": 1, "metadata": pattern.metadata,
            "scores": [[round(float(x), 6) for x in row] for row in pattern.scores.tolist()]}
    if pattern.selection is not None:
        body["selection"] = pattern.selection
    p.write_text(json.dumps(body, indent=1) + "\n")
    if pattern.calibrated_for_streaming:
        rows = ["\t".join(f"{float(x):.6f}" for x in row) for row in pattern.scores.tolist()]
        p.with_name(DUO_FILE).write_text("\n".join(rows) + "\n")
    return p


def binarize(scores: torch.Tensor, sparsity: float, layers: Sequence[int] | None = None) -> torch.Tensor:
    """(layers, KV heads) scores -> bool flags, True for streaming heads.

    The round(sparsity * num_heads) lowest-scoring heads over the whole model stream; equal scores
    are ordered by (layer, head), so the same file and sparsity always give the same heads.
    `layers`: only these layers' heads may stream and count (a model's full-attention layers,
    when its other layers slide); None: every layer.
    """
    if not 0.0 <= sparsity <= 1.0 or math.isnan(sparsity):
        raise ValueError(f"streaming sparsity must be in [0, 1], got {sparsity!r}")
    heads = scores.shape[1]
    flat = scores.reshape(-1).double()
    allowed = range(flat.numel()) if layers is None else [l * heads + h for l in layers for h in range(heads)]
    num_streaming = int(round(sparsity * len(allowed)))
    order = sorted(allowed, key=lambda i: (float(flat[i]), i))
    flags = torch.zeros(flat.numel(), dtype=torch.bool)
    flags[order[:num_streaming]] = True
    return flags.view(scores.shape)


def shipped_pattern(model_name: str) -> Path | None:
    """A pattern shipped inside the package for this model (`lserve/patterns/<model_name>.json`)."""
    candidate = SHIPPED_DIR / f"{model_name}.json"
    return candidate if candidate.is_file() else None
