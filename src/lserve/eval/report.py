"""Results of an evaluation: per-group accuracy, the side-by-side table, the JSON file and the plots.

Accuracy is the mean sample score in percent (a sample scores 0 or 1, or a fraction of its
references for RULER's multi-answer tasks). RULER's average is the mean over subtasks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from lserve.eval.runner import ConfigResult
from lserve.eval.sample import Sample


def length_label(length: int) -> str:
    """1024 -> "1k", 1536 -> "1.5k", 500 -> "500"."""
    return f"{length / 1024:g}k" if length >= 1024 and length % 256 == 0 else str(length)


def _mean(values: Sequence[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def group_scores(
    samples: Sequence[Sample], result: ConfigResult, key: Callable[[Sample], Hashable]
) -> dict[Hashable, list[float]]:
    """Scores of a configuration grouped by `key(sample)`, in first-seen order."""
    groups: dict[Hashable, list[float]] = {}
    if not result.ok:
        return groups
    for sample, value in zip(samples, result.scores):
        groups.setdefault(key(sample), []).append(value)
    return groups


def summarize(task: str, samples: Sequence[Sample], result: ConfigResult) -> dict[str, Any]:
    """Accuracy (percent) overall and by length; by depth for niah; by subtask for ruler."""
    out: dict[str, Any] = {"accuracy": None}
    if not result.ok:
        return out
    by_length = {str(k): _mean(v) for k, v in group_scores(samples, result, lambda s: s.length).items()}
    out["by_length"] = by_length
    if task == "ruler":
        subs = group_scores(samples, result, lambda s: (s.subtask, s.length))
        table: dict[str, dict[str, float | None]] = {}
        for (sub, length), values in subs.items():
            table.setdefault(sub, {})[str(length)] = _mean(values)
        out["by_subtask"] = table
        averages = {length: [table[sub][length] for sub in table if table[sub].get(length) is not None]
                    for length in by_length}
        out["by_length"] = {k: sum(v) / len(v) if v else None for k, v in averages.items()}  # type: ignore[misc]
        values = [x for x in out["by_length"].values() if x is not None]
        out["accuracy"] = sum(values) / len(values) if values else None
        return out
    out["accuracy"] = _mean(result.scores)
    if task == "niah" or any(s.depth is not None for s in samples):
        out["by_depth"] = {f"{k:g}": _mean(v) for k, v in group_scores(samples, result, lambda s: s.depth).items()}
        grid: dict[str, dict[str, float | None]] = {}
        for (length, depth), values in group_scores(samples, result, lambda s: (s.length, s.depth)).items():
            grid.setdefault(str(length), {})[f"{depth:g}"] = _mean(values)
        out["by_length_depth"] = grid
    return out


def _cell(values: list[float] | None, ok: bool) -> str:
    if not ok:
        return "failed"
    if not values:
        return "-"
    mean = 100.0 * sum(values) / len(values)
    if all(v in (0.0, 1.0) for v in values):
        return f"{mean:.0f}% ({int(sum(values))}/{len(values)})"
    return f"{mean:.1f}%"


def _rows(task: str, samples: Sequence[Sample]) -> list[tuple[str, Callable[[Sample], bool]]]:
    lengths = list(dict.fromkeys(s.length for s in samples))
    rows: list[tuple[str, Callable[[Sample], bool]]] = []
    if task == "ruler":
        for sub in dict.fromkeys(s.subtask for s in samples):
            for length in lengths:
                rows.append((f"{sub} {length_label(length)}", lambda s, a=sub, b=length: s.subtask == a and s.length == b))
        return rows
    rows += [(length_label(n), lambda s, n=n: s.length == n) for n in lengths]
    if task == "niah":
        depths = sorted({s.depth for s in samples if s.depth is not None})
        rows += [(f"depth {d:.0%}", lambda s, d=d: s.depth == d) for d in depths]
    rows.append(("all", lambda s: True))
    return rows


def format_table(task: str, samples: Sequence[Sample], results: Sequence[ConfigResult]) -> str:
    """A Markdown table: one row per length (and depth, or subtask x length), one column per config."""
    header = ["length" if task != "ruler" else "subtask length", *[r.name for r in results]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, match in _rows(task, samples):
        cells = []
        for r in results:
            values = [v for s, v in zip(samples, r.scores) if match(s)] if r.ok else None
            cells.append(_cell(values, r.ok))
        lines.append("| " + " | ".join([label, *cells]) + " |")
    if task == "ruler":
        summaries = [summarize(task, samples, r) for r in results]
        for length in dict.fromkeys(s.length for s in samples):
            cells = []
            for r, summary in zip(results, summaries):
                value = summary.get("by_length", {}).get(str(length)) if r.ok else None
                cells.append("failed" if not r.ok else ("-" if value is None else f"{value:.1f}%"))
            lines.append("| " + " | ".join([f"average {length_label(length)}", *cells]) + " |")
    extra = [("time (s)", [f"{r.seconds:.1f}" if r.ok else "-" for r in results])]
    if any(r.stats for r in results):
        extra.append(("streaming heads", [
            f"{r.stats['streaming_head_fraction']:.2f}" if r.ok and r.stats else "-" for r in results
        ]))
        extra.append(("decode pages read", [
            f"{r.stats['decode_pages_read_fraction']:.3f}"
            if r.ok and r.stats.get("decode_pages_read_fraction") is not None else "-" for r in results
        ]))
    for label, cells in extra:
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def failure_lines(results: Sequence[ConfigResult]) -> list[str]:
    """One line per failed configuration, and a count of failed requests where some failed."""
    lines = []
    for r in results:
        if not r.ok:
            lines.append(f"{r.name}: failed: {r.error}")
        elif any(r.sample_errors):
            errors = [e for e in r.sample_errors if e]
            lines.append(f"{r.name}: {len(errors)} of {len(r.sample_errors)} requests failed (scored 0); first: {errors[0]}")
    return lines


def results_payload(
    task: str, samples: Sequence[Sample], results: Sequence[ConfigResult], meta: dict[str, Any]
) -> dict[str, Any]:
    """Everything needed to redo the tables and plots: settings, per-config summaries, every sample."""
    configs = []
    for r in results:
        configs.append({
            "name": r.name, "overrides": r.overrides, "status": r.status, "error": r.error,
            "seconds": r.seconds, "stats": r.stats, **summarize(task, samples, r),
        })
    rows = []
    for i, s in enumerate(samples):
        rows.append({
            "id": s.sample_id, "subtask": s.subtask or None, "length": s.length, "depth": s.depth, "index": s.index,
            "num_tokens": s.num_tokens, "answers": s.answers, "scorer": s.scorer,
            "outputs": {r.name: r.outputs[i] for r in results if r.ok},
            "scores": {r.name: r.scores[i] for r in results if r.ok},
            "errors": {r.name: r.sample_errors[i] for r in results if r.sample_errors and r.sample_errors[i]},
        })
    return {**meta, "task": task, "configs": configs, "samples": rows}


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


# ---- plots -----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_accuracy(
    path: Path, title: str, panels: dict[str, dict[str, dict[int, float | None]]], failed: Sequence[str] = ()
) -> Path:
    """Accuracy vs length: one panel per entry of `panels` ({panel: {config: {length: %}}}).

    Configurations in `failed` appear in the legend only, marked as failed.
    """
    n = len(panels)
    cols = min(n, 4)
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]
    rows = -(-n // cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
    for i, (panel, series) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for k, (name, points) in enumerate(series.items()):
            xs = [x for x, y in points.items() if y is not None]
            marker, line = styles[k % len(styles)]
            # later configs drawn thinner and on top, so equal curves stay visible
            ax.plot(xs, [points[x] for x in xs], marker=marker, linestyle=line, label=name,
                    linewidth=max(0.8, 2.6 - 0.6 * k), markersize=max(3.0, 8 - 1.5 * k), zorder=2 + k)
        lengths = sorted({x for points in series.values() for x in points})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [length_label(x) for x in lengths])
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if i == 0:
            for name in failed:
                ax.plot([], [], linestyle="none", marker="x", color="grey", label=f"{name} (failed)")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_heatmaps(path: Path, title: str, grids: dict[str, dict[str, dict[str, float | None]] | None]) -> Path:
    """Length x depth heatmaps side by side, one per config ({config: {length: {depth: %}}}, None = failed)."""
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("acc", ["#d7301f", "#fdae61", "#ffffbf", "#66bd63", "#1a9850"])
    fig = _figure(1.2 + 3.8 * len(grids), 4.0)
    image = None
    for i, (name, grid) in enumerate(grids.items()):
        ax = fig.add_subplot(1, len(grids), i + 1)
        ax.set_title(name, fontsize=10)
        if not grid:
            ax.text(0.5, 0.5, "failed", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        lengths = sorted(grid, key=int)
        depths = sorted({d for row in grid.values() for d in row}, key=float)
        values = [[grid[length].get(d) for length in lengths] for d in depths]
        data = [[float("nan") if v is None else v for v in row] for row in values]
        image = ax.imshow(data, cmap=cmap, vmin=0, vmax=100, aspect="auto", origin="upper")
        for y, row in enumerate(values):
            for x, v in enumerate(row):
                if v is not None:
                    ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [length_label(int(x)) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="accuracy (%)")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_plots(
    task: str, samples: Sequence[Sample], results: Sequence[ConfigResult], out_dir: Path, model: str
) -> list[Path]:
    """niah: heatmaps (and accuracy vs length); passkey: accuracy vs length; ruler: one panel per subtask."""
    summaries = {r.name: summarize(task, samples, r) for r in results}

    def series(get: Callable[[dict[str, Any]], dict[str, float | None] | None]) -> dict[str, dict[int, float | None]]:
        out = {}
        for name, summary in summaries.items():
            values = get(summary)
            if values:
                out[name] = {int(k): v for k, v in values.items()}
        return out

    paths = []
    if task == "niah":
        grids = {name: s.get("by_length_depth") for name, s in summaries.items()}
        paths.append(plot_heatmaps(out_dir / "niah_heatmap.png", f"needle in a haystack, {model}", grids))
    panels: dict[str, dict[str, dict[int, float | None]]] = {}
    if task == "ruler":
        for sub in dict.fromkeys(s.subtask for s in samples):
            panels[sub] = series(lambda s, sub=sub: (s.get("by_subtask") or {}).get(sub))
        panels["average"] = series(lambda s: s.get("by_length"))
    else:
        panels[task] = series(lambda s: s.get("by_length"))
    if any(panels.values()):
        failed = [r.name for r in results if not r.ok]
        paths.append(plot_accuracy(out_dir / f"{task}_accuracy.png", f"{task}, {model}", panels, failed))
    return paths


def load_payload(path: Path) -> tuple[str, list[Sample], list[ConfigResult], dict[str, Any]]:
    """Read a results JSON back (task, samples without their text, results, metadata) to redo the
    table and the plots without running anything."""
    try:
        data = json.loads(path.read_text())
        task = data["task"]
        samples = [
            Sample(task, row.get("subtask") or "", int(row["length"]), row.get("depth"), int(row["index"]), "", "",
                   [0] * int(row["num_tokens"]), list(row["answers"]), row["scorer"], 0)
            for row in data["samples"]
        ]
        results = []
        for c in data["configs"]:
            ok = c["status"] == "ok"
            results.append(ConfigResult(
                c["name"], c.get("overrides") or {}, c["status"], c.get("error"),
                outputs=[row["outputs"][c["name"]] for row in data["samples"]] if ok else [],
                scores=[float(row["scores"][c["name"]]) for row in data["samples"]] if ok else [],
                sample_errors=[row.get("errors", {}).get(c["name"], "") for row in data["samples"]],
                seconds=float(c.get("seconds") or 0.0), stats=c.get("stats") or {},
            ))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot read lserve eval results from {path}: {type(exc).__name__}: {exc}") from exc
    meta = {k: v for k, v in data.items() if k not in ("task", "configs", "samples")}
    return task, samples, results, meta
