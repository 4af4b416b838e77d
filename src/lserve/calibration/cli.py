"""`lserve calibrate`: the subcommand's flags and what it prints (`lserve.cli` registers it)."""

from __future__ import annotations

import argparse
from typing import Any

from lserve.calibration.config import CalibrationConfig, spread

DEFAULTS = CalibrationConfig(output="")


def parse_context_lengths(text: str, num_samples: int) -> tuple[int, ...]:
    """'MIN:MAX' -> `num_samples` lengths spread evenly; '1024,2048' -> exactly those lengths."""
    try:
        if ":" in text:
            low, high = (int(x) for x in text.split(":"))
            if not 1 <= low <= high:
                raise ValueError
            if num_samples < 1:
                raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
            return spread(low, high, num_samples)
        values = tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        if str(exc).startswith("--num-samples"):
            raise
        raise ValueError(f"--context-lengths must be MIN:MAX with 1 <= MIN <= MAX, or a comma list of "
                         f"positive integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"--context-lengths must be positive, got {text!r}")
    return values


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'4,1' -> (4, 1)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of integers, got {text!r}") from None


def add_calibrate_parser(sub: Any) -> None:
    """Register `lserve calibrate` on the CLI's subparsers."""
    d = DEFAULTS
    p = sub.add_parser(
        "calibrate", help="calibrate a streaming-head pattern for a model (DuoAttention-style gates)",
        description="Optimise one gate per (layer, KV head): attention = gate*dense + (1-gate)*streaming, "
        "frozen weights, on generated multi-passkey samples. Writes full_attention_heads.tsv, "
        "<model>.json (usable as --attn-pattern) and config.json into --output.",
    )
    p.add_argument("--model", default=None, help="HF folder, .gguf file or gemma-3-270m (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--load-format", default="auto", choices=["auto", "hf", "gguf"], help="how to read --model")
    p.add_argument("--output", required=True, help="output folder (created if needed)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps, one sample each (default: {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default: {d.lr})")
    p.add_argument("--reg", type=float, default=d.reg, help=f"weight of mean|gate| in the loss (default: {d.reg})")
    p.add_argument("--context-lengths", default="1024:3072",
                   help="sample lengths in tokens: MIN:MAX spread over --num-samples, or a comma list (default: 1024:3072)")
    p.add_argument("--num-samples", type=int, default=50, help="samples for a MIN:MAX range (default: 50)")
    p.add_argument("--sink", type=int, default=d.sink, help=f"streaming heads' sink tokens (default: {d.sink})")
    p.add_argument("--local", type=int, default=d.local, help=f"streaming heads' local window (default: {d.local})")
    p.add_argument("--num-passkeys", type=int, default=d.num_passkeys, help=f"passkeys per sample (default: {d.num_passkeys})")
    p.add_argument("--passkey-length", type=int, default=d.passkey_length,
                   help=f"NATO words per passkey (default: {d.passkey_length})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the samples and their order (default: {d.seed})")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bfloat16", "float16", "float32"],
                   help="default: bfloat16 (float32 on a CPU without bf16 instructions)")
    p.add_argument("--haystack-file", default=None, help="text file whose sentences fill the haystack (default: generated)")
    p.add_argument("--no-chat-template", action="store_true", help="plain text samples even if the model has a chat template")
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"write gate checkpoints every N steps (default: {d.save_every})")
    p.add_argument("--checkpoint-layers", action="store_true",
                   help="recompute each layer in the backward pass (less memory for long contexts, ~30%% slower)")
    sel = p.add_argument_group(
        "page selection (--selection)",
        "Instead of the head gates: measure each page score's recall and its passkey and needle-in-a-haystack "
        "answers against exact attention and write the chosen score (and calibrated label channels) into the "
        "pattern's `selection`.")
    sel.add_argument("--selection", action="store_true", help="calibrate the page score of page selection")
    sel.add_argument("--pattern", default=None,
                     help="head pattern to add the choice to (default: the one shipped for the model, else all dense)")
    sel.add_argument("--token-budget", type=int, default=512, help="token budget the scores are measured at (default: 512)")
    sel.add_argument("--score-channels", type=int, default=None,
                     help="key channels of the channel scores (default: 16 for rope_mass, else 8)")
    sel.add_argument("--passkey-lengths", default="2048,4096,6144",
                     help="lengths of the passkey and haystack prompts whose answers are compared "
                     "(default: 2048,4096,6144)")
    sel.add_argument("--passkey-samples", type=int, default=4,
                     help="passkey prompts per length, and haystack prompts per length and depth (default: 4)")
    sel.add_argument("--selector-intervals", default="4,1",
                     help="re-selection intervals: every score is measured at the first, the chosen one at each, "
                     "and the one keeping the most answers is written (default: 4,1)")
    sel.add_argument("--selection-local-tokens", default="0,128",
                     help="local windows (selection_local_tokens) the chosen score is then measured with at its "
                     "interval; the one keeping the most answers is written (default: 0,128)")
    sel.add_argument("--selection-page-sizes", default="64,16",
                     help="KV page sizes: every run before uses the first; the chosen score, interval and window "
                     "are then measured at each, and the one keeping the most answers is written (default: 64,16)")
    sel.add_argument("--selection-channel-counts", default="auto",
                     help="channel counts a chosen RoPE channel score is measured with last; the one keeping the "
                     "most answers is written (default auto: its r and twice that)")
    sel.add_argument("--no-selection-fp8-labels", dest="selection_fp8_labels", action="store_false",
                     help="do not also measure FP8 labels at twice each channel count (label_dtype=fp8)")
    sel.add_argument("--streaming-sparsity", type=float, default=0.5,
                     help="answers are also compared with this share of the pattern's heads streaming (0: not; default 0.5)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate_selection(args: argparse.Namespace) -> int:
    from lserve.calibration.selection import SelectionCalibrationConfig, calibrate_selection

    cfg = SelectionCalibrationConfig(
        output=args.output, model=args.model, load_format=args.load_format, pattern=args.pattern,
        token_budget=args.token_budget, score_channels=args.score_channels,
        lengths=parse_context_lengths(args.passkey_lengths, 1), num_samples=args.passkey_samples, seed=args.seed,
        device=args.device, dtype=args.dtype, streaming_sparsity=args.streaming_sparsity,
        intervals=parse_int_list(args.selector_intervals, "--selector-intervals"),
        local_tokens=parse_int_list(args.selection_local_tokens, "--selection-local-tokens"),
        page_sizes=parse_int_list(args.selection_page_sizes, "--selection-page-sizes"),
        channel_counts=None if args.selection_channel_counts == "auto"
        else parse_int_list(args.selection_channel_counts, "--selection-channel-counts"),
        fp8_labels=args.selection_fp8_labels,
    )
    result = calibrate_selection(cfg)
    measured = result.selection["measured"]
    print(f"wrote {result.pattern_path}: page_score={result.selection['page_score']}, "
          f"selector_interval={result.selection['selector_interval']}, "
          f"selection_local_tokens={result.selection['selection_local_tokens']}, "
          f"page_size={result.selection['page_size']}, score_channels={result.selection['score_channels']}, "
          f"label_dtype={result.selection['label_dtype']} "
          f"(token budget {measured['token_budget']})")
    kept = measured["answers_kept"]
    n = measured["samples"]
    for name in kept["alone"]:
        recall = measured["recall"].get(name)
        print(f"  {name:>15}: answers " + ", ".join(f"{kept[s][name]}/{n} {s}" for s in kept)
              + (f"; recall {recall:.3f}" if recall is not None else ""))
    print(f"  {'oracle':>15}: recall {measured['recall']['oracle']:.3f}")
    by_interval = measured["answers_kept_by_interval"]
    for name in by_interval["alone"]:
        print(f"  {result.selection['page_score']}, re-selected {name} steps: answers "
              + ", ".join(f"{by_interval[s][name]}/{n} {s}" for s in by_interval))
    for key, unit in (("answers_kept_by_local_tokens", " tokens"), ("answers_kept_by_page_size", ""),
                      ("answers_kept_by_channels", "")):
        by = measured[key]
        for name in by["alone"]:
            print(f"  {result.selection['page_score']}, {name}{unit}: answers "
                  + ", ".join(f"{by[s][name]}/{n} {s}" for s in by))
    print(f"  wall time {result.wall_time_s / 60:.1f} min")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.selection:
        return cmd_calibrate_selection(args)
    from lserve.calibration.train import calibrate

    cfg = CalibrationConfig(
        output=args.output, model=args.model, load_format=args.load_format, steps=args.steps, lr=args.lr,
        reg=args.reg, context_lengths=parse_context_lengths(args.context_lengths, args.num_samples),
        sink=args.sink, local=args.local, num_passkeys=args.num_passkeys, passkey_length=args.passkey_length,
        seed=args.seed, device=args.device, dtype=args.dtype, haystack_file=args.haystack_file,
        chat_template=not args.no_chat_template, save_every=args.save_every, checkpoint_layers=args.checkpoint_layers,
    )
    result = calibrate(cfg)
    g = result.calibrated  # sliding-window layers' gates are not calibrated
    print(f"wrote {result.pattern_path} and {result.tsv_path}")
    print(f"final loss {result.final_loss:.5f}; gates: mean {float(g.mean()):.3f}, "
          f"{int((g > 0.95).sum())}/{g.numel()} > 0.95, {int((g < 0.05).sum())}/{g.numel()} < 0.05; "
          f"wall time {result.wall_time_s / 60:.1f} min")
    return 0
