"""Perplexity of a text and top-1 agreement between engine configurations, side by side.

    python benchmarks/perplexity.py --compare bf16: --compare w8:quantization=fp8 \
        --compare w8kv8:quantization=fp8,kv_cache_dtype=fp8 [--text-file FILE] [--window 2048]

The text is tokenized once and cut into windows of `--window` tokens; each window is one prompt
whose tokens' log-probabilities the engine returns (`prompt_logprobs=1`, so every window runs
through chunked prefill and the KV cache exactly as serving does: an FP8 cache's later chunks
read the quantized K/V of the earlier ones). Perplexity is exp of the mean negative
log-likelihood over every predicted token. "top-1 agree" is teacher-forced: the share of
positions where a configuration's most likely next token is the first configuration's.

The default text is the GNU GPL version 3 (`/usr/share/common-licenses/GPL-3` on Debian and
Ubuntu), English prose that none of the shipped models was tuned on; pass any other file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from lserve import LLM, SamplingParams
from lserve.eval.options import ConfigSpec, check_engine_settings, parse_compare_list
from lserve.eval.system import hardware_description

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def score(llm: LLM, windows: list[list[int]]) -> tuple[list[float], list[int]]:
    """Per predicted token: its log-probability and the model's most likely token there."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=True)
    logprobs: list[float] = []
    top: list[int] = []
    for window, out in zip(windows, outs):
        assert out.prompt_logprobs is not None
        for token, entry in zip(window[1:], out.prompt_logprobs[1:]):
            assert entry is not None
            logprobs.append(entry[token].logprob)
            top.append(next(t for t, lp in entry.items() if lp.rank == 1))
    return logprobs, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: the embedded default model)")
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--window", type=int, default=2048, help="tokens per prompt")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compare", action="append", help="NAME:field=value,... (the first is the reference)")
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()
    if not args.text_file.is_file():
        raise SystemExit(f"no text file at {args.text_file}; pass --text-file")
    base = {"model": args.model, "dtype": args.dtype, "device": args.device}
    specs: list[ConfigSpec] = parse_compare_list(args.compare)
    check_engine_settings(base, specs)

    text = args.text_file.read_text(encoding="utf-8", errors="replace")
    rows = []
    reference_top: list[int] | None = None
    windows: list[list[int]] = []
    for spec in specs:
        llm = LLM(**{**base, **spec.overrides})
        if not windows:
            ids = llm.get_tokenizer().encode(text)
            windows = [ids[i:i + args.window] for i in range(0, len(ids) - 1, args.window)]
            windows = [w for w in windows if len(w) > 1][: args.max_windows]
            print(f"# {hardware_description(args.device)}; {args.text_file} ({len(ids)} tokens), "
                  f"{len(windows)} windows of <= {args.window}")
        start = time.perf_counter()
        logprobs, top = score(llm, windows)
        seconds = time.perf_counter() - start
        reference_top = reference_top or top
        agree = sum(a == b for a, b in zip(top, reference_top)) / len(top)
        ppl = math.exp(-sum(logprobs) / len(logprobs))
        rows.append({"name": spec.name, "overrides": spec.overrides, "tokens": len(logprobs), "perplexity": ppl,
                     "top1_agreement": agree, "seconds": seconds})
        del llm
    ref = rows[0]["perplexity"]
    print(f"{'config':<14} {'tokens':>7} {'perplexity':>11} {'vs first':>9} {'top-1 agree':>12} {'time s':>8}")
    for r in rows:
        print(f"{r['name']:<14} {r['tokens']:>7} {r['perplexity']:>11.4f} {r['perplexity'] / ref - 1:>+9.2%} "
              f"{r['top1_agreement']:>12.2%} {r['seconds']:>8.1f}")
    if args.output_json:
        args.output_json.write_text(json.dumps({"hardware": hardware_description(args.device),
                                                "text": str(args.text_file), "window": args.window,
                                                "model": args.model or "default", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
