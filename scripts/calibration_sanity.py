"""Passkey retrieval with streaming heads: a calibrated pattern vs a random one vs dense attention.

A quick check that calibration chose the right heads (the formal table comes from `lserve eval`):
the same passkey prompts (tests/passkey.py: a 5-digit key in repetitive filler, chat template) run
through `LLM` dense, with the pattern under test, and with random gates at the same sparsity.

    PYTHONPATH=src python scripts/calibration_sanity.py --pattern src/lserve/patterns/SmolLM2-135M-Instruct.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests/passkey.py

from lserve import LLM, SamplingParams
from lserve.sparse.patterns import HeadPattern, load_pattern, save_pattern
from tests.passkey import FILLER, passkey_messages


def prompts(llm: LLM, lengths: list[int], samples: int) -> list[tuple[list[dict[str, str]], str, int]]:
    """`samples` prompts per length, needles at evenly spaced depths: (messages, key, length)."""
    tok = llm.engine.tokenizer
    per_filler = len(tok.encode(FILLER * 200)) / 200
    out = []
    for n in lengths:
        for i in range(samples):
            messages, key = passkey_messages(int(n / per_filler), seed=1000 * n + i, depth=(i + 0.5) / samples)
            out.append((messages, key, n))
    return out


def accuracy(llm: LLM, cases: list[tuple[list[dict[str, str]], str, int]]) -> dict[int, tuple[int, int]]:
    params = SamplingParams(temperature=0.0, max_tokens=16)  # "The pass key is 12345." is ~11 tokens
    outs = llm.chat([c[0] for c in cases], params, use_tqdm=False)
    score: dict[int, tuple[int, int]] = {}
    for (_, key, n), out in zip(cases, outs, strict=True):
        hit, total = score.get(n, (0, 0))
        score[n] = (hit + (key in out.outputs[0].text), total + 1)
    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", required=True, help="pattern under test (.json or DuoAttention .tsv)")
    ap.add_argument("--lengths", default="2048,3072,4096", help="prompt lengths in tokens")
    ap.add_argument("--samples", type=int, default=10, help="prompts per length")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--local", type=int, default=512)
    ap.add_argument("--random-seed", type=int, default=0, help="seed of the random gates")
    ap.add_argument("--skip-dense", action="store_true")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    shape = load_pattern(args.pattern).shape
    tmp = Path(tempfile.mkdtemp())
    gen = torch.Generator().manual_seed(args.random_seed)
    random_path = save_pattern(HeadPattern(torch.rand(shape, generator=gen), {"method": "random gates"}),
                               tmp / "random.json")
    sparse = {"streaming_sparsity": args.sparsity, "prefill_sink_tokens": args.sink, "prefill_local_tokens": args.local,
              "decode_sink_tokens": args.sink, "decode_local_tokens": args.local}
    configs = {"calibrated": dict(sparse, attn_pattern=str(args.pattern)),
               "random": dict(sparse, attn_pattern=str(random_path))}
    if not args.skip_dense:
        configs = {"dense": {}, **configs}
    cases = None
    print(f"lengths {lengths}, {args.samples} prompts each, streaming sparsity {args.sparsity}, "
          f"sink/local {args.sink}/{args.local}")
    for name, kwargs in configs.items():
        t0 = time.time()
        llm = LLM(dtype="float32", num_kv_pages=400, max_num_seqs=4, **kwargs)
        cases = cases or prompts(llm, lengths, args.samples)
        score = accuracy(llm, cases)
        hits = sum(h for h, _ in score.values())
        per = ", ".join(f"{n}: {h}/{t}" for n, (h, t) in sorted(score.items()))
        print(f"{name:>10}: {hits}/{len(cases)}  ({per})  [{time.time() - t0:.0f} s]", flush=True)
        del llm


if __name__ == "__main__":
    main()
