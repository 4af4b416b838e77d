"""Start-up and the first decode steps of a fresh engine: decode graphs captured at start-up
against captured lazily on first use (the engine before start-up capture), one run.

    python benchmarks/first_steps.py [--model dummy:llama-3-8b] [--batch 3] [--prompt-len 512] [--steps 20]

Per variant: seconds from `LLM(...)` to ready, then one batch of `--batch` random prompts (a batch
size the engine has not run before) decoding `--steps` + 8 tokens greedily: the wall time of each
of the first `--steps` decode steps (host clock around `LLMEngine.step`, synchronous scheduling so
that each step's time is its own), their maximum against the median of the last 8 (the steady
step). Needs a CUDA GPU (graphs exist only there).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from lserve import LLM, SamplingParams
from lserve.runner.cuda_graphs import DecodeGraphs


def run(args: argparse.Namespace, lazy: bool) -> dict[str, float]:
    with mock.patch.object(DecodeGraphs, "capture_all", lambda self, modes: None) if lazy else contextlib.nullcontext():
        t0 = time.perf_counter()
        llm = LLM(model=args.model, max_model_len=args.prompt_len + args.steps + 16, max_num_seqs=16,
                  async_scheduling=False)
        torch.cuda.synchronize()
        ready = time.perf_counter() - t0
    engine = llm.llm_engine
    gen = torch.Generator().manual_seed(0)
    vocab = engine.core.arch.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.steps + 9, ignore_eos=True)
    for prompt in torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen).tolist():
        engine.add_request(prompt, params)
    times = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    decode = times[-(args.steps + 8):]  # the prefill steps come first
    first, steady = decode[: args.steps], statistics.median(decode[-8:])
    return {"ready_s": ready, "max_first_ms": 1000 * max(first), "steady_ms": 1000 * steady,
            "ratio": max(first) / steady, "first_ms": [round(1000 * x, 2) for x in first]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("first_steps.py needs a CUDA GPU (decode graphs exist only there)")
    rows = {name: run(args, lazy) for name, lazy in (("lazy capture", True), ("start-up capture", False))}
    print(f"{torch.cuda.get_device_name()}; {args.model}; batch {args.batch}, {args.prompt_len}-token prompts")
    print(f"| graphs | LLM() to ready (s) | slowest of the first {args.steps} decode steps (ms) | steady step (ms) "
          "| ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['ready_s']:.1f} | {r['max_first_ms']:.2f} | {r['steady_ms']:.2f} | {r['ratio']:.2f} |")
    for name, r in rows.items():
        print(f"{name}: first steps (ms) {r['first_ms']}")


if __name__ == "__main__":
    main()
