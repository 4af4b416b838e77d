"""`lserve eval`: build the samples once, run them through every configuration, report side by side.

    lserve eval --task passkey --lengths 2k,4k,6k --num-samples 20 \\
        --compare dense: --compare "stream50:streaming_sparsity=0.5,decode_local_tokens=512"

This module only defines the arguments and the flow; it imports torch and the engine lazily so
`lserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lserve.config import engine_fields
from lserve.eval.options import (
    ConfigSpec,
    check_engine_settings,
    parse_compare_list,
    parse_depths,
    parse_size_list,
)

TASKS = ("passkey", "niah", "ruler")
DEFAULT_SAMPLES = {"passkey": 10, "niah": 1, "ruler": 5}


def add_eval_parser(sub: Any, add_engine_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `lserve eval` on the CLI's subparsers (engine flags come from the CLI's generator)."""
    p = sub.add_parser(
        "eval", help="long-context accuracy: passkey, needle in a haystack, RULER-style tasks",
        description="Generate long-context tasks offline (seeded), run them through one or more engine "
        "configurations (or OpenAI-compatible servers), score them exactly, and write a table, JSON and plots.",
    )
    p.add_argument("--task", choices=TASKS, help="which task family to run (required unless --replot)")
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in the model's tokens (default: 1k,2k,4k)")
    p.add_argument("--depths", default=None,
                   help="needle depths in [0, 1] or %%, e.g. 0,0.5,1 (niah default: 0,0.25,0.5,0.75,1; passkey: "
                   "spread evenly over the samples)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples per length (passkey, default 10), per length x depth cell (niah, default 1) or "
                   "per length x subtask (ruler, default 5)")
    p.add_argument("--subtasks", default=None, help="ruler: comma-separated subset of the subtasks (default: all)")
    p.add_argument("--haystack-file", type=Path, default=None, help="niah: a text file to use as the haystack")
    p.add_argument("--compare", action="append", metavar="NAME:FIELD=VALUE,...",
                   help="an engine configuration to evaluate (repeatable), e.g. dense: or "
                   "\"stream50:streaming_sparsity=0.5,decode_local_tokens=512\"; default: one 'default' config")
    p.add_argument("--base-url", action="append", metavar="[NAME=]URL",
                   help="evaluate an OpenAI-compatible server instead of the in-process engine (repeatable)")
    p.add_argument("--served-model-name", default=None,
                   help="model name sent to --base-url servers (default: the first of GET /v1/models)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per server (default: 8)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="samples the engine runs at once (sets --max-num-seqs unless given; default: 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="answer tokens per sample (default: per task)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (default: 0)")
    p.add_argument("--no-chat", action="store_true", help="plain prompts instead of the model's chat template (the default when the tokenizer has none: a base model)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--replot", type=Path, default=None, metavar="TASK.json",
                   help="only reprint the table and redraw the plots (into --output-dir) from a results file")
    p.add_argument("--output-dir", type=Path, default=Path("lserve-eval"),
                   help="where TASK.json and the plots go (default: ./lserve-eval)")
    add_engine_flags(p)
    p.set_defaults(func=run_eval_command)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for _, f in engine_fields()}
    return {k: v for k, v in vars(args).items() if k in names}


def _check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def parse_base_urls(values: list[str]) -> list[tuple[str, str]]:
    """`[NAME=]URL` items -> (name, normalized url); the default name is the URL's host:port."""
    from urllib.parse import urlparse

    from lserve.eval.client import normalize_base_url

    out = []
    for value in values:
        name, eq, url = value.partition("=")
        if not eq or "://" in name:
            name, url = "", value
        base = normalize_base_url(url)
        out.append((name or urlparse(base).netloc, base))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("--base-url names must be unique; write NAME=URL")
    return out


def build_samples(args: argparse.Namespace, fmt: Any, lengths: list[int], depths: list[float] | None) -> list[Any]:
    """The task's samples (identical for every configuration)."""
    num = args.num_samples or DEFAULT_SAMPLES[args.task]
    extra = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    if args.task == "passkey":
        from lserve.eval.passkey import make_passkey_samples

        return make_passkey_samples(fmt, lengths, num, depths, args.data_seed, **extra)
    if args.task == "niah":
        from lserve.eval.niah import DEFAULT_DEPTHS, make_niah_samples

        return make_niah_samples(fmt, lengths, depths or list(DEFAULT_DEPTHS), num, args.data_seed,
                                 args.haystack_file, **extra)
    from lserve.eval.ruler import make_ruler_samples, parse_subtasks

    return make_ruler_samples(fmt, lengths, parse_subtasks(args.subtasks), num, args.data_seed, **extra)


def task_max_tokens(args: argparse.Namespace) -> int:
    """The most answer tokens any sample of the task asks for (for the length check)."""
    if args.max_tokens:
        return int(args.max_tokens)
    if args.task == "passkey":
        from lserve.eval.passkey import MAX_TOKENS

        return MAX_TOKENS
    if args.task == "niah":
        from lserve.eval.niah import MAX_TOKENS as NIAH_MAX

        return NIAH_MAX
    from lserve.eval.ruler import SUBTASKS, parse_subtasks

    return max(SUBTASKS[s].max_tokens for s in parse_subtasks(args.subtasks))


def check_lengths(lengths: list[int], answer_tokens: int, limit: int, model: str) -> None:
    """One clear error for a length the model cannot take (prompt + answer over its limit)."""
    from lserve.eval.report import length_label

    for length in lengths:
        if length + answer_tokens > limit:
            raise ValueError(
                f"--lengths {length_label(length)}: a {length}-token prompt plus {answer_tokens} answer tokens "
                f"exceeds the maximum model length of {limit} tokens ({model}); the longest usable length is "
                f"{limit - answer_tokens}"
            )


def run_eval_command(args: argparse.Namespace) -> int:
    """The whole `lserve eval` flow; returns the exit status (1 when every configuration failed)."""
    if args.replot is not None:
        return replot(args.replot, args.output_dir)
    if args.task is None:
        raise ValueError("--task is required (passkey, niah or ruler)")
    _check_positive(args, ("num_samples", "batch_size", "concurrency", "max_tokens"))
    if args.subtasks and args.task != "ruler":
        raise ValueError("--subtasks applies to --task ruler only")
    if args.haystack_file and args.task != "niah":
        raise ValueError("--haystack-file applies to --task niah only")
    if args.haystack_file and not args.haystack_file.is_file():
        raise ValueError(f"--haystack-file {args.haystack_file} does not exist")
    if args.base_url and args.compare:
        raise ValueError("--compare configures the in-process engine; with --base-url, give one URL per engine")
    lengths = parse_size_list(args.lengths, "length")
    depths = parse_depths(args.depths) if args.depths else None
    servers = parse_base_urls(args.base_url) if args.base_url else []
    specs = parse_compare_list(args.compare)
    base = _engine_kwargs(args)
    base.setdefault("max_num_seqs", min(args.batch_size, 256))
    check_engine_settings(base, specs)
    try:  # fail now rather than after a long run
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create --output-dir {args.output_dir}: {exc.strerror or exc}") from exc

    from lserve.eval.report import (
        failure_lines,
        format_table,
        results_payload,
        write_json,
        write_plots,
    )
    from lserve.eval.sample import PromptFormat
    from lserve.eval.system import hardware_description, load_tokenizer_for, model_info

    info = model_info(base, [s.overrides for s in specs])
    check_lengths(lengths, task_max_tokens(args), info.limit, info.name)
    fmt = PromptFormat(load_tokenizer_for(base), chat=False if args.no_chat else None)
    print(f"lserve eval: building {args.task} samples for {info.name} ...", file=sys.stderr)
    samples = build_samples(args, fmt, lengths, depths)
    results = _run_all(args, samples, specs, servers, base)

    meta = {
        "model": info.name, "model_path": info.path, "chat": fmt.chat, "data_seed": args.data_seed,
        "lengths": lengths, "depths": depths, "num_samples": args.num_samples or DEFAULT_SAMPLES[args.task],
        "max_model_len": info.limit, "hardware": hardware_description(base.get("device", "auto")),
        "base_engine_settings": base, "lserve_version": _version(),
    }
    payload = results_payload(args.task, samples, results, meta)
    out_dir: Path = args.output_dir
    json_path = write_json(out_dir / f"{args.task}.json", payload)
    plots = [] if args.no_plots else write_plots(args.task, samples, results, out_dir, info.name)

    print(f"\n{args.task} on {info.name} ({len(samples)} samples per configuration)\n")
    print(format_table(args.task, samples, results))
    for spec in specs if not servers else []:
        print(f"  {spec.describe()}")
    for line in failure_lines(results):
        print(line)
    print(f"\nresults: {json_path}" + "".join(f"\nplot: {p}" for p in plots))
    return 0 if any(r.ok for r in results) else 1


def replot(path: Path, out_dir: Path) -> int:
    """Reprint the table and redraw the plots of a finished run."""
    from lserve.eval.report import (
        failure_lines,
        format_table,
        load_payload,
        write_plots,
    )

    task, samples, results, meta = load_payload(path)
    plots = write_plots(task, samples, results, out_dir, str(meta.get("model", "")))
    print(format_table(task, samples, results))
    for line in failure_lines(results):
        print(line)
    print("".join(f"plot: {p}\n" for p in plots), end="")
    return 0


def _run_all(
    args: argparse.Namespace, samples: list[Any], specs: list[ConfigSpec], servers: list[tuple[str, str]],
    base: dict[str, Any],
) -> list[Any]:
    from lserve.eval.runner import run_engine_config, run_server_config

    if servers:
        from lserve.eval.client import served_model_name

        results = []
        for name, url in servers:
            model = args.served_model_name or served_model_name(url)
            results.append(run_server_config(name, url, model, samples, args.concurrency))
        return results
    return [run_engine_config(spec, base, samples) for spec in specs]


def _version() -> str:
    from lserve import __version__

    return __version__
