"""Sampled decode through the engine: the batched sampler against the per-row sampling it
replaced (temperature, top-k, top-p and a multinomial draw per row: `filtered_probs` +
`torch.multinomial`, the reference the tests compare the batched sampler with), one run.

    python benchmarks/sampled_decode.py [--batch 32] [--context 1024] [--output-len 48] [--rounds 3] [--device auto]

Each configuration serves `batch` prompts of `context` tokens (random ids) and generates
`output-len` tokens each with temperature 0.8, top-p 0.9, top-k 50 and a seed per request
(EOS ignored), after a warm-up, the configurations taking turns for `rounds` rounds (a busy machine
slows whichever runs at the time; the median of the rounds is kept). Prefix caching is off, so
each round prefills its prompts. Prints the decode throughput (generated tokens / seconds after
the prefill) of both and their ratio, and greedy decoding's beside them (what the step costs
without sampling).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence

import torch

from lserve import LLM, SamplingParams
from lserve.runner.sampler import RowContext, Sampler, filtered_probs, process_batch


class PerRowSampler(Sampler):
    """The sampler before batching: one filter and one multinomial draw per non-greedy row."""

    def sample(self, logits: torch.Tensor, request_ids: Sequence[str], params: Sequence[SamplingParams],
               contexts: Sequence[RowContext | None]) -> torch.Tensor:
        process_batch(logits, params, contexts)
        tokens = logits.argmax(dim=-1)
        for i, p in enumerate(params):
            if not p.is_greedy:
                probs = filtered_probs(logits[i], p)
                tokens[i] = torch.multinomial(probs, 1, generator=self._generator_for(request_ids[i], p))[0]
        return tokens


def decode_throughput(llm: LLM, batch: int, context: int, output_len: int, seed: int,
                      greedy: bool = False) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of one batch."""
    gen = torch.Generator().manual_seed(seed)
    vocab = llm.engine.core.arch.vocab_size
    prompts = [torch.randint(100, vocab, (context,), generator=gen).tolist() for _ in range(batch)]
    engine = llm.engine
    for i, ids in enumerate(prompts):
        engine.add_request(ids, SamplingParams(temperature=0.0 if greedy else 0.8, top_p=0.9, top_k=50,
                                               seed=seed + i, max_tokens=output_len, ignore_eos=True))
    start = time.perf_counter()
    first_tokens_at = None
    generated = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        generated += len(outs)
        if first_tokens_at is None and generated >= batch:
            first_tokens_at = time.perf_counter()  # every request has its first token: prefill done
            generated_at_first = generated
    end = time.perf_counter()
    assert first_tokens_at is not None
    return first_tokens_at - start, (generated - generated_at_first) / (end - first_tokens_at)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="turns of every configuration (the median is kept)")
    args = ap.parse_args()
    llm = LLM(device=args.device, dtype=args.dtype, max_num_seqs=args.batch, enable_prefix_caching=False)
    runner = llm.engine.core.runner
    batched = runner.sampler
    per_row = PerRowSampler(batched.device, seed=0)
    decode_throughput(llm, 4, 64, 4, seed=99)  # warm-up
    configs = (("per row", per_row, False), ("batched", batched, False),
               ("greedy (no sampling: the floor)", batched, True))
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in configs}
    for _ in range(args.rounds):
        for name, sampler, greedy in configs:
            runner.sampler = sampler
            runs[name].append(decode_throughput(llm, args.batch, args.context, args.output_len, seed=1, greedy=greedy))
    rows = [(name, statistics.median(p for p, _ in r), statistics.median(t for _, t in r), [t for _, t in r])
            for name, r in runs.items()]
    device = torch.cuda.get_device_name() if llm.engine.core.device.type == "cuda" \
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"{device}; default model; batch {args.batch}, {args.context}-token prompts, {args.output_len} tokens "
          "each; temperature 0.8, top-p 0.9, top-k 50, a seed per request")
    print(f"medians of {args.rounds} rounds, the configurations taking turns")
    print("| sampler | prefill (s) | decode tokens/s | x | each round (tokens/s) |\n|---|---:|---:|---:|---|")
    for name, prefill_s, tps, each in rows:
        print(f"| {name} | {prefill_s:.1f} | {tps:.1f} | {tps / rows[0][2]:.2f} | {' / '.join(f'{t:.1f}' for t in each)} |")


if __name__ == "__main__":
    main()
