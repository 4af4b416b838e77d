"""Which page score ranks the KV pages of page selection, and on which key channels.

Five scores (docs/sparsity.md has the measurements behind them):
- `quest`: Quest's upper bound over per-logical-page key min/max, sum_c max(q_c kmax_c, q_c kmin_c);
- `midrange`: q . (kmin + kmax) / 2 over the same statistics (the box's centre, no slack term);
- `rope_channels`: exact partial dot products q_C . k_C on r channels C per KV head, kept per
  token beside the pages; C = the r/2 slowest-rotating RoPE frequencies, both channels of each
  rotation pair (no calibration);
- `label_channels`: the same with channels chosen per (layer, KV head) by calibration
  (DoubleSparsity's "label channels"), read from the model's pattern file;
- `rope_mass`: on the same RoPE channels (16 by default), an estimate of the attention mass of
  the page: log sum over the group's query heads g and the page's tokens t of
  exp(q_gC . k_tC / tau_g), with SparQ's temperature tau_g = sqrt(D |q_gC|_1 / |q_g|_1). Each
  query head counts through its own softmax-like term, so one head that retrieves is not
  drowned by the group's others, as it is when their queries are summed first.

The channel scores' labels are stored in the model's dtype, or (`label_dtype="fp8"`) as E4M3
with one power-of-two scale per token and KV head, the FP8 KV cache's format: twice the channels
in about the same bytes.

`auto` takes the choice that `lserve calibrate --selection` wrote into the model's pattern file
(the shipped one for the default model), else `rope_channels`; with it, the pattern's calibrated
re-selection interval (`selector_interval`), channel count and label dtype where the settings are
left unset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

from lserve.config import LABEL_DTYPES, check_page_size
from lserve.errors import LServeError

CHANNEL_SCORES = ("rope_channels", "label_channels", "rope_mass")
STATISTICS_SCORES = ("quest", "midrange")
DEFAULT_PAGE_SCORE = "rope_channels"
DEFAULT_CHANNELS = {"rope_channels": 8, "label_channels": 8, "rope_mass": 16}
"""r of each channel score when `score_channels` is not set."""
DEFAULT_SELECTOR_INTERVAL = 4
"""Decode steps between re-selections when neither the setting nor the pattern gives one (LServe's)."""


@dataclass(frozen=True)
class ScoreSpec:
    """The resolved page score of an engine."""

    kind: str
    """quest, midrange, rope_channels, label_channels or rope_mass."""
    channels: torch.Tensor | None = None
    """(layers, KV heads, r) int64 key channels of a channel score (model head numbering)."""
    source: str = ""
    """Where the choice came from (for the log)."""
    interval: int = DEFAULT_SELECTOR_INTERVAL
    """Decode steps between re-selections of a request's pages."""
    local_tokens: int | None = None
    """The pattern's calibrated `selection_local_tokens` when `auto` took its choice (None: none given)."""
    label_fp8: bool = False
    """A channel score's labels are stored as E4M3 with per-token scales (`label_dtype="fp8"`)."""

    @property
    def uses_labels(self) -> bool:
        """Channel scores keep r key channels per token; the others keep per-page min/max."""
        return self.kind in CHANNEL_SCORES

    @property
    def num_channels(self) -> int:
        return int(self.channels.shape[2]) if self.channels is not None else 0


def local_window_fits(local_tokens: int, token_budget: int, page_size: int) -> bool:
    """Whether a `selection_local_tokens` window leaves the budget at least one page for the score
    beside the first page, the window's pages and the newest page (what a calibrated window
    needs to be worth applying)."""
    return (-(-local_tokens // page_size) + 3) * page_size <= token_budget


def rope_slow_channels(inv_freq: torch.Tensor, r: int) -> list[int]:
    """The r key channels of the r/2 slowest-rotating RoPE frequencies, ascending.

    Rotate-half layout (lserve's and Hugging Face's): channel i and i + D/2 rotate together at
    `inv_freq[i]`. Their partial products change least with the distance between query and key,
    so they carry content rather than position."""
    half = int(inv_freq.shape[0])
    if r % 2 or not 2 <= r <= 2 * half:
        raise LServeError(f"score_channels={r} must be even and at most the head dimension {2 * half}")
    slowest = torch.argsort(inv_freq.double(), stable=True)[: r // 2].tolist()
    return sorted(slowest + [i + half for i in slowest])


def _channels_from_choice(choice: dict[str, Any], num_layers: int, num_kv_heads: int, head_dim: int,
                          source: str) -> torch.Tensor:
    try:
        channels = torch.tensor(choice["channels"], dtype=torch.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise LServeError(f"{source}: the selection's label channels are missing or not a table of integers") from exc
    if channels.ndim != 3 or channels.shape[:2] != (num_layers, num_kv_heads):
        raise LServeError(f"{source}: label channels have shape {tuple(channels.shape)}, the model needs "
                          f"({num_layers}, {num_kv_heads}, r)")
    if channels.numel() and (channels.min() < 0 or channels.max() >= head_dim):
        raise LServeError(f"{source}: label channels must lie in [0, {head_dim})")
    return channels


def resolve_page_score(
    requested: str,
    num_channels: int | None,
    selection: dict[str, Any] | None,
    inv_freq: torch.Tensor,
    num_layers: int,
    num_kv_heads: int,
    source: str = "",
    interval: int | None = None,
    label_dtype: str | None = None,
) -> ScoreSpec:
    """The engine's page score: `requested` (a config value), the pattern's `selection` choice
    for `auto` (and the channels of `label_channels`), `rope_channels` otherwise.

    r is `num_channels` if given, else the pattern's `score_channels` when `auto` takes its
    choice, else the score's default (`DEFAULT_CHANNELS`). Likewise the re-selection interval:
    `interval` if given, else the pattern's `selector_interval` when `auto` takes its choice (it
    was measured with that score), else `DEFAULT_SELECTOR_INTERVAL`; and the pattern's
    `selection_local_tokens` when `auto` takes its choice (`ScoreSpec.local_tokens`; the engine
    decides whether it applies); and the labels' dtype, `label_dtype` if given, else the
    pattern's `label_dtype` when `auto` takes its choice, else the model's ("auto")."""
    head_dim = 2 * int(inv_freq.shape[0])
    kind, origin = requested, "setting"
    local: int | None = None
    if requested == "auto":
        if _auto_takes(selection):
            kind, origin = str(selection["page_score"]), f"calibrated ({source})"
            if num_channels is None and "score_channels" in selection:
                num_channels = int(selection["score_channels"])
            if interval is None and "selector_interval" in selection:
                interval = _pattern_int(selection["selector_interval"], "selector_interval", 1, source)
            if "selection_local_tokens" in selection:
                local = _pattern_int(selection["selection_local_tokens"], "selection_local_tokens", 0, source)
            if label_dtype is None and "label_dtype" in selection:
                label_dtype = selection["label_dtype"]
                if label_dtype not in LABEL_DTYPES:
                    raise LServeError(f"{source}: the selection's label_dtype must be one of "
                                      f"{', '.join(LABEL_DTYPES)}, got {label_dtype!r}")
        else:
            kind, origin = DEFAULT_PAGE_SCORE, "default"
    if interval is None:
        interval = DEFAULT_SELECTOR_INTERVAL
    if kind in STATISTICS_SCORES:
        return ScoreSpec(kind, None, origin, interval, local)
    if num_channels is None:
        num_channels = DEFAULT_CHANNELS[kind]
    fp8 = label_dtype == "fp8"
    if kind in ("rope_channels", "rope_mass"):
        chans = torch.tensor(rope_slow_channels(inv_freq, num_channels), dtype=torch.int64)
        return ScoreSpec(kind, chans.expand(num_layers, num_kv_heads, -1).contiguous(), origin, interval, local,
                         fp8)
    if selection is None or "channels" not in selection:
        raise LServeError(
            "page_score='label_channels' needs label channels calibrated for the model (`lserve calibrate "
            "--selection` writes them into its pattern file; pass it as attn_pattern)"
        )
    return ScoreSpec(kind, _channels_from_choice(selection, num_layers, num_kv_heads, head_dim, source), origin,
                     interval, local, fp8)


def pattern_page_size(selection: dict[str, Any] | None, source: str = "") -> int | None:
    """The KV page size the pattern's selection choice was measured with (`page_size`), None if
    it names none or `auto` would not take its choice (the engine's default pages)."""
    if not _auto_takes(selection) or "page_size" not in selection:
        return None
    page = selection["page_size"]
    try:
        check_page_size(page)
    except ValueError as exc:
        raise LServeError(f"{source}: the selection's {exc}") from None
    return page


def _auto_takes(selection: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """Whether `page_score=auto` takes this pattern selection's choice (it names a known score)."""
    return selection is not None and selection.get("page_score") in (*STATISTICS_SCORES, *CHANNEL_SCORES)


def _pattern_int(value: Any, name: str, low: int, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LServeError(f"{source}: the selection's {name} must be an integer >= {low}, got {value!r}")
    return value
