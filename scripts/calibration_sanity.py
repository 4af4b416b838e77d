"""Passkey retrieval with streaming heads: a calibrated pattern vs a random one vs dense attention.

A quick check that calibration chose the right heads (the formal table comes from `lserve eval`).
Two modes, each comparing dense attention, the pattern under test and random gates at the same
sparsity (binarised the engine's way):
- engine (default): tests/passkey.py prompts (a 5-digit key in repetitive filler, chat template)
  through `LLM`, greedy; a hit is the key in the answer;
- `--teacher-forced`: held-out calibration-style samples (varied haystack, several 8-word NATO
  passkeys; seed 1234, not the calibration seed) through the bare model with 0/1 gates; the score
  is the share of passkey words predicted (argmax) with the answer teacher-forced, and the share of
  passkeys whose first word is right (the first word can only come from the needle).

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
from lserve.sparse.patterns import HeadPattern, binarize, load_pattern, save_pattern
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


def teacher_forced(args: argparse.Namespace, lengths: list[int], shape: tuple[int, int]) -> None:
    from lserve.calibration.data import make_dataset
    from lserve.calibration.gated import GatedAttention, final_hidden
    from lserve.engine.tokenizer import load_tokenizer
    from lserve.model.loader import load_model, read_arch_config, resolve_source

    source = resolve_source(None, "auto")
    arch, factors = read_arch_config(source)
    model = load_model(source, arch, factors, torch.bfloat16, torch.device("cpu"))
    tok = load_tokenizer(source)
    samples = make_dataset(tok, [n for n in lengths for _ in range(args.samples)], args.num_passkeys, 8, seed=1234)
    gates = {"dense": None,
             "calibrated": (~binarize(load_pattern(args.pattern).scores, args.sparsity)).float()}
    for seed in (int(x) for x in args.random_seeds.split(",")):
        scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        gates[f"random{seed}"] = (~binarize(scores, args.sparsity)).float()
    print(f"teacher-forced: lengths {lengths}, {args.samples} samples each, {args.num_passkeys} passkeys, "
          f"streaming sparsity {args.sparsity}, sink/local {args.sink}/{args.local}")
    for name, g in gates.items():
        t0, words, firsts = time.time(), [], []
        attn = GatedAttention(g, args.sink, args.local)
        for s in samples:
            ids, labels = torch.tensor(s.input_ids), torch.tensor(s.label_positions)
            with torch.no_grad():
                hit = model.compute_logits(final_hidden(model, ids, attn)[labels]).argmax(-1) == ids[labels + 1]
            words.append(hit.float().mean().item())
            sizes = [len(tok.encode(" " + p, add_special_tokens=False)) for p in s.passkeys]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]  # label run of each passkey, in order
            firsts.extend(bool(hit[i]) for i in starts)
        print(f"{name:>10}: words {sum(words) / len(words):.1%}, first words {sum(firsts)}/{len(firsts)}  "
              f"[{time.time() - t0:.0f} s]", flush=True)


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
    ap.add_argument("--teacher-forced", action="store_true", help="bare-model check on calibration-style samples")
    ap.add_argument("--num-passkeys", type=int, default=4, help="teacher-forced: passkeys per sample")
    ap.add_argument("--random-seeds", default="0,1,2", help="teacher-forced: seeds of the random patterns")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    shape = load_pattern(args.pattern).shape
    if args.teacher_forced:
        teacher_forced(args, lengths, shape)
        return
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
