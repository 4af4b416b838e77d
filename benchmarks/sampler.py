"""The sampler's cost per step: the batched sampler against one-row-at-a-time sampling (the
per-row reference `filtered_probs` + `torch.multinomial`, the algorithm it replaced).

    python benchmarks/sampler.py [--batches 1,8,32] [--vocab 49152] [--device cpu] [--top-k 50]

Rows sample with temperature 0.8, top-p 0.9, top-k 50 (`--top-k 0`: none, so the batched sampler
sorts the whole vocabulary) and a seed each. Prints the median milliseconds per step of each and
their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lserve.runner.sampler import Sampler, filtered_probs
from lserve.sampling_params import SamplingParams


def per_row(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> torch.Tensor:
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        tokens[i] = torch.multinomial(filtered_probs(logits[i], p), 1, generator=gens[i])[0]
    return tokens


def timed(fn, device: torch.device, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top-k", type=int, default=50)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"# {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, vocabulary {args.vocab}, "
          f"temperature 0.8, top-p 0.9, top-k {args.top_k}, a seed per row")
    print("| batch | per row ms | batched ms | x |\n|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batches.split(",")]:
        logits = torch.randn(batch, args.vocab, device=device) * 3
        params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=args.top_k, seed=i) for i in range(batch)]
        ids = [str(i) for i in range(batch)]
        gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
        sampler = Sampler(device, seed=0)
        old = timed(lambda: per_row(logits.clone(), params, gens), device)
        new = timed(lambda: sampler.sample(logits.clone(), ids, params, [None] * batch), device)
        print(f"| {batch} | {old:.2f} | {new:.2f} | {old / new:.1f} |")


if __name__ == "__main__":
    main()
