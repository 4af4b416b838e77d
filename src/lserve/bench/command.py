"""`lserve bench`: engine speed, dense vs sparse configurations in one run; or a server under load.

    lserve bench --dummy-config llama-3-8b --input-len 32k,128k --output-len 64 --batch-size 1,8 \\
        --compare dense: --compare "sparse:streaming_sparsity=0.5,attn_pattern=P.tsv"
    lserve bench --dummy-config llama-3-8b --shared-prefix-len 64k --input-len 256 --output-len 8 \\
        --num-prompts 32 --compare off:enable_prefix_caching=false --compare on:enable_prefix_caching=true
    lserve bench --base-url http://localhost:8000 --input-len 1k --output-len 128 --num-prompts 200 \\
        --max-concurrency 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lserve.config import engine_fields
from lserve.eval.options import (
    ConfigSpec,
    check_engine_settings,
    parse_compare_list,
    parse_size_list,
)

RANDOM_PATTERN = "random"


def add_bench_parser(sub: Any, add_engine_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `lserve bench` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench", help="prefill/decode speed, throughput and KV memory, dense vs sparse side by side",
        description="Time static batches of random prompts through one or more engine configurations "
        "(ratios against the first), or requests that share a long document one after another "
        "(--shared-prefix-len), or load an OpenAI-compatible server (--base-url) and report TTFT, "
        "TPOT, ITL and throughput as vLLM's bench serve does.",
    )
    p.add_argument("--dummy-config", default=None, metavar="NAME",
                   help="random weights in a shipped model shape (llama-3-8b, llama-3.1-8b, llama-2-7b, qwen2.5-7b, "
                   "gemma-3-12b)")
    p.add_argument("--input-len", default="1k", help="prompt tokens, comma-separated for several (default: 1k)")
    p.add_argument("--output-len", default="64", help="generated tokens, comma-separated (default: 64)")
    p.add_argument("--batch-size", default="1", help="sequences per batch, comma-separated (default: 1)")
    p.add_argument("--compare", action="append", metavar="NAME:FIELD=VALUE,...",
                   help="an engine configuration (repeatable); ratios are against the first. attn_pattern=random "
                   "makes a seeded random head pattern of the model's shape (for speed work on dummy models)")
    p.add_argument("--num-warmups", type=int, default=1,
                   help="untimed runs of each case (its prompts, at most 16 output tokens) before timing it (default: 1)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    p.add_argument("--output-json", type=Path, default=None, help="write all results to this JSON file")
    x = p.add_argument_group("shared-prefix mode (--shared-prefix-len)")
    x.add_argument("--shared-prefix-len", default=None, metavar="TOKENS",
                   help="every request is this many tokens of one shared random document plus --input-len tokens "
                   "of its own; --num-prompts requests (default: 32) run one after another, and the table gives "
                   "the first request's TTFT, the median of the others', the total time and the prefix-cache hits")
    s = p.add_argument_group("server mode (--base-url)")
    s.add_argument("--base-url", default=None, help="benchmark an OpenAI-compatible server at this URL")
    s.add_argument("--served-model-name", default=None, help="model name to send (default: GET /v1/models)")
    s.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    s.add_argument("--num-prompts", type=int, default=None,
                   help="requests to send (default: 100; 32 with --shared-prefix-len)")
    s.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: all)")
    s.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1 = Poisson)")
    s.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (outputs may be shorter)")
    s.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="of ttft,tpot,itl,e2el")
    s.add_argument("--metric-percentiles", default="99", help="e.g. 50,90,99 (default: 99)")
    add_engine_flags(p)
    p.set_defaults(func=run_bench_command)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for _, f in engine_fields()}
    return {k: v for k, v in vars(args).items() if k in names}


def _base_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    base = _engine_kwargs(args)
    if args.dummy_config:
        if "model" in base:
            raise ValueError("give --model or --dummy-config, not both")
        base["model"] = f"dummy:{args.dummy_config}"
        if base.get("load_format", "dummy") != "dummy":
            raise ValueError("--dummy-config loads random weights; --load-format must be dummy or left out")
    return base


def run_bench_command(args: argparse.Namespace) -> int:
    """The whole `lserve bench` flow; returns the exit status (1 when nothing could be measured)."""
    inputs = parse_size_list(args.input_len, "input length")
    outputs = parse_size_list(args.output_len, "output length")
    batches = parse_size_list(args.batch_size, "batch size")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    base = _base_kwargs(args)
    if args.output_json is not None:  # fail now rather than after a long run
        try:
            args.output_json.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the folder of --output-json {args.output_json}: {exc}") from exc
    if args.base_url:
        if args.shared_prefix_len is not None:
            raise ValueError("--shared-prefix-len runs the in-process engine; it does not apply with --base-url")
        return _run_server(args, base, inputs, outputs)
    if args.shared_prefix_len is not None:
        return _run_shared_prefix(args, base, inputs, outputs, batches)
    return _run_offline(args, base, inputs, outputs, batches)


def _run_offline(
    args: argparse.Namespace, base: dict[str, Any], inputs: list[int], outputs: list[int], batches: list[int]
) -> int:
    from lserve.bench.offline import Case
    from lserve.eval.system import model_info

    specs = parse_compare_list(args.compare)
    need = max(inputs) + max(outputs)
    base.setdefault("max_num_seqs", max(batches))
    check_engine_settings(base, specs)
    info = model_info(base, [s.overrides for s in specs])
    _fit_max_model_len(base, specs, info, need, "input + output")
    cases = [Case(i, o, b) for i, o, b in itertools.product(inputs, outputs, batches)]
    with tempfile.TemporaryDirectory(prefix="lserve-bench-") as tmp:
        run_specs = [with_random_pattern(s, info.arch, Path(tmp), args.data_seed) for s in specs]
        return _report_offline(args, base, info, specs, run_specs, cases)


def _fit_max_model_len(base: dict[str, Any], specs: list[ConfigSpec], info: Any, need: int, what: str) -> None:
    """Size the KV cache for exactly the longest request unless a max_model_len is given; a
    request longer than the model's limit is refused (dummy weights have no trained limit)."""
    if "max_model_len" not in base and not any("max_model_len" in s.overrides for s in specs):
        if need > info.limit and info.load_format != "dummy":
            raise ValueError(f"{what} = {need} tokens exceeds {info.name}'s limit of {info.limit} tokens")
        base["max_model_len"] = need
    elif need > info.limit:
        raise ValueError(f"{what} = {need} tokens exceeds max_model_len={info.limit}")


def _run_shared_prefix(
    args: argparse.Namespace, base: dict[str, Any], inputs: list[int], outputs: list[int], batches: list[int]
) -> int:
    from lserve.bench.shared_prefix import Workload, bench_shared_prefix, format_prefix_results
    from lserve.eval.system import hardware_description, model_info

    prefix = parse_size_list(args.shared_prefix_len, "shared prefix length")
    if len(prefix) > 1 or len(inputs) > 1 or len(outputs) > 1 or batches != [1]:
        raise ValueError("with --shared-prefix-len give one --input-len and one --output-len, and no --batch-size "
                         "(the requests run one after another)")
    num = 32 if args.num_prompts is None else args.num_prompts
    if num < 2:
        raise ValueError(f"--num-prompts must be >= 2 with --shared-prefix-len (the first request is the cold one), "
                         f"got {num}")
    work = Workload(prefix[0], inputs[0], outputs[0], num)
    specs = parse_compare_list(args.compare)
    base.setdefault("max_num_seqs", 1)
    check_engine_settings(base, specs)
    info = model_info(base, [s.overrides for s in specs])
    need = work.prefix_len + work.question_len + work.output_len
    _fit_max_model_len(base, specs, info, need, "prefix + input + output")
    with tempfile.TemporaryDirectory(prefix="lserve-bench-") as tmp:
        run_specs = [with_random_pattern(s, info.arch, Path(tmp), args.data_seed) for s in specs]
        hardware = hardware_description(base.get("device", "auto"))
        print(f"hardware: {hardware}")
        print(f"model: {info.name} ({info.load_format}; {info.shape()})")
        print(f"workload: {num} requests one after another, each a shared {work.prefix_len}-token document + "
              f"{work.question_len} tokens of its own, {work.output_len} output tokens; configurations: "
              f"{', '.join(s.describe() for s in specs)}", flush=True)
        results = bench_shared_prefix(run_specs, base, work, args.data_seed, args.num_warmups,
                                      on_result=_print_prefix_progress)
    print()
    print(format_prefix_results(results))
    for r in results:
        if r.status != "ok":
            print(f"{r.config}: failed: {r.error}")
    if args.output_json:
        _write_json(args.output_json, {
            "hardware": hardware, "model": info.name, "model_shape": info.shape(), "engine_settings": base,
            "workload": vars(work), "configs": [{"name": s.name, "overrides": s.overrides} for s in specs],
            "results": [r.to_dict() for r in results],
        })
    return 0 if any(r.status == "ok" for r in results) else 1


def _print_prefix_progress(r: Any) -> None:
    """One line per configuration as it finishes (a run cut short still shows what it measured)."""
    if r.status != "ok":
        print(f"{r.config}: failed: {r.error}", file=sys.stderr, flush=True)
        return
    rest = "-" if r.ttft_rest_median_s is None else f"{r.ttft_rest_median_s:.3f} s"
    print(f"{r.config}: TTFT request 1 {r.ttft_first_s:.3f} s, requests 2..N median {rest}, "
          f"total {r.total_time_s:.2f} s, hit rate {r.hit_rate:.3f}", file=sys.stderr, flush=True)


def with_random_pattern(spec: ConfigSpec, arch: Any, folder: Path, seed: int) -> ConfigSpec:
    """`attn_pattern=random`: a seeded random head pattern of the model's shape (speed does not
    depend on which heads stream), written to `folder` for the engine to load."""
    if spec.overrides.get("attn_pattern") != RANDOM_PATTERN:
        return spec
    import torch

    from lserve.sparse.patterns import HeadPattern, save_pattern

    scores = torch.rand((arch.num_layers, arch.num_kv_heads), generator=torch.Generator().manual_seed(seed))
    path = save_pattern(HeadPattern(scores, {"method": "random (lserve bench attn_pattern=random)"}),
                        folder / f"{spec.name}-random-heads.json")
    return ConfigSpec(spec.name, {**spec.overrides, "attn_pattern": str(path)})


def _report_offline(
    args: argparse.Namespace, base: dict[str, Any], info: Any, specs: list[ConfigSpec], run_specs: list[ConfigSpec],
    cases: list[Any],
) -> int:
    from lserve.bench.offline import add_ratios, bench_config, format_results
    from lserve.eval.system import hardware_description

    hardware = hardware_description(base.get("device", "auto"))
    print(f"hardware: {hardware}")
    print(f"model: {info.name} ({info.load_format}; {info.shape()})")
    print(f"cases: {len(cases)} (input {args.input_len}, output {args.output_len}, batch {args.batch_size}); "
          f"configurations: {', '.join(s.describe() for s in specs)}", flush=True)
    results = []
    for spec in run_specs:
        print(f"running {spec.name} ...", file=sys.stderr, flush=True)
        results.extend(bench_config(spec, base, cases, args.data_seed, args.num_warmups))
    add_ratios(results)
    print()
    print(format_results(results))
    failed = sorted({(r.config, r.error) for r in results if r.status != "ok"})
    for name, error in failed:
        print(f"{name}: failed: {error}")
    if args.output_json:
        payload = {
            "hardware": hardware, "model": info.name, "model_path": info.path, "load_format": info.load_format,
            "model_shape": info.shape(), "engine_settings": base,
            "configs": [{"name": s.name, "overrides": s.overrides} for s in specs],
            "results": [r.to_dict() for r in results],
        }
        _write_json(args.output_json, payload)
    return 0 if any(r.status == "ok" for r in results) else 1


def _run_server(args: argparse.Namespace, base: dict[str, Any], inputs: list[int], outputs: list[int]) -> int:
    from lserve.bench.serve import (
        METRIC_TITLES,
        ServeOptions,
        format_summary,
        run_serve_bench,
    )
    from lserve.eval.client import normalize_base_url, served_model_name
    from lserve.eval.system import load_tokenizer_for, model_info

    if args.compare:
        raise ValueError("--compare configures the in-process engine; it does not apply with --base-url")
    if len(inputs) > 1 or len(outputs) > 1:
        raise ValueError("with --base-url give one --input-len and one --output-len")
    if (args.num_prompts is not None and args.num_prompts < 1) or (
            args.max_concurrency is not None and args.max_concurrency < 1):
        raise ValueError("--num-prompts and --max-concurrency must be >= 1")
    if not args.request_rate > 0 or not args.burstiness > 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    metrics = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRIC_TITLES]
    if unknown:
        raise ValueError(f"unknown --percentile-metrics {unknown[0]!r}; choose from {', '.join(METRIC_TITLES)}")
    try:
        percentiles = tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip())
    except ValueError as exc:
        raise ValueError(f"bad --metric-percentiles {args.metric_percentiles!r}") from exc
    if not percentiles or any(not 0 < p <= 100 for p in percentiles):
        raise ValueError("--metric-percentiles must be numbers in (0, 100]")
    url = normalize_base_url(args.base_url)
    num_prompts = 100 if args.num_prompts is None else args.num_prompts
    info = model_info(base, [])
    tokenizer = load_tokenizer_for(base)
    opts = ServeOptions(
        base_url=url, model=args.served_model_name or served_model_name(url), input_len=inputs[0],
        output_len=outputs[0], num_prompts=num_prompts, max_concurrency=args.max_concurrency or num_prompts,
        request_rate=args.request_rate, burstiness=args.burstiness, seed=args.data_seed,
        ignore_eos=not args.no_ignore_eos, endpoint=args.endpoint, percentile_metrics=metrics,
        percentiles=percentiles,
    )
    summary = run_serve_bench(opts, tokenizer, info.arch.vocab_size)
    print(format_summary(summary, opts))
    errors = [e for e in summary["errors"] if e]
    if errors:
        print(f"{len(errors)} requests failed; first: {errors[0]}")
    if args.output_json:
        _write_json(args.output_json, summary)
    return 0 if summary["completed"] else 1


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"results: {path}")
