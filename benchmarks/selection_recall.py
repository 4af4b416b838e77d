"""How much true attention each page score's selection keeps, on the default model (CPU, minutes).

    python benchmarks/selection_recall.py [--fillers 80,130,170] [--depths 0.25,0.6] [--queries 8]
        [--budgets 256,512,1024] [--rope-r 4,8,16] [--label-r 8] [--mass-r 16,32] [--fp8-mass-r 32,64]
        [--calib-source haystack|passkey]
        [--json PATH] [--plot PATH]

Runs the default model (SmolLM2-135M-Instruct, float32, CPU) once per passkey prompt
(`tests/passkey.py`, one per filler count x needle depth) with exact attention, the true key
appended after the prompt (teacher forcing, so the queries of the answer steps exist), and
captures every layer's keys and the last queries (`lserve.calibration.selection_recall`).

For each page score the engine has (quest, midrange, rope_channels with r = `--rope-r`,
label_channels with r = `--label-r` calibrated on a different prompt, rope_mass with r =
`--mass-r`, by default 16 and 32, and on FP8 labels with r = `--fp8-mass-r`, by default 32 and
64: the engine's `label_dtype="fp8"`) and the oracle (pages by
true attention mass), with the engine's own score functions, 64-token pages, logical pages of 16,
scores summed over each GQA group, it prints:

1. recall (the share of each query head's true attention on the selected pages, averaged over
   the group, the last `--queries` prompt positions and the prompts) per budget: all layers,
   layers 0-1, layers 2+, the worst (layer, KV head);
2. recall per layer at the 512-token budget (mean over KV heads);
3. the rank (0 = best) of the needle's page among the older pages per (layer, KV head) at the
   last prompt position, worst over the prompts (a page is read at budget B iff its rank is
   below B/64 - 1: 3, 7, 15 for 256, 512, 1024);
4. the copy heads (true attention on the needle's page at the answer steps >= `--copy-mass`):
   their attention on page 0 and the needle, and each score's worst rank of the needle's page
   over the answer steps.

`--calib-source haystack` (default) calibrates the label channels on a sample of the streaming
calibration data (`lserve.calibration.data`: varied sentences, two NATO passkeys, the answer);
`passkey` on a passkey prompt of another length, depth and key. `--json PATH` writes every
number (per prompt, layer and head); `--plot PATH` draws table 3 (and the answer steps) as heat
maps. Scoring runs on one thread (`--threads`): the small tensor ops are faster so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lserve import LLM  # noqa: E402
from lserve.calibration import selection_recall as sr  # noqa: E402
from lserve.calibration.data import make_dataset  # noqa: E402
from lserve.sparse.selection import DEFAULT_CHANNELS, rope_slow_channels  # noqa: E402
from tests.passkey import passkey_messages  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
BUDGET_TABLE = 512


@dataclass
class Prompt:
    """A passkey prompt as token ids, with the needle's token range and the key's tokens."""

    ids: list[int]
    needle: tuple[int, int]
    answer: list[int]
    info: dict[str, Any]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fillers", type=ints, default=[80, 130, 170], help="filler sentences per prompt (~24 tokens each)")
    p.add_argument("--depths", type=floats, default=[0.25, 0.6], help="needle depths (a prompt per filler x depth)")
    p.add_argument("--seed", type=int, default=0, help="passkey seed of the first prompt (then +1 per prompt)")
    p.add_argument("--queries", type=int, default=8, help="last prompt positions taken as decode queries for recall")
    p.add_argument("--budgets", type=ints, default=[256, 512, 1024], help="token budgets")
    p.add_argument("--rope-r", type=ints, default=[4, 8, 16], help="channel counts of rope_channels")
    p.add_argument("--label-r", type=int, default=8, help="channel count of label_channels")
    p.add_argument("--mass-r", type=ints, default=[DEFAULT_CHANNELS["rope_mass"], 32],
                   help="channel counts of rope_mass")
    p.add_argument("--fp8-mass-r", type=ints, default=[32, 64],
                   help="channel counts of rope_mass on FP8 labels (empty: none)")
    p.add_argument("--calib-source", choices=("haystack", "passkey"), default="haystack")
    p.add_argument("--calib-tokens", type=int, default=3000, help="length of the haystack calibration sample")
    p.add_argument("--calib-queries", type=int, default=512, help="last positions of the calibration prompt used")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--logical", type=int, default=16, help="logical page size of quest / midrange statistics")
    p.add_argument("--copy-mass", type=float, default=0.3, help="needle attention that makes a copy head")
    p.add_argument("--threads", type=int, default=1, help="torch threads while scoring")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--plot", type=Path, default=None, help="heat maps of the needle ranks (matplotlib)")
    return p.parse_args()


def passkey_prompt(tok: Any, fillers: int, depth: float, seed: int) -> Prompt:
    """`passkey_messages` through the chat template; the needle located by character offsets."""
    messages, key = passkey_messages(fillers, seed=seed, depth=depth)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    needle_text = f"The pass key is {key}. Remember it. {key} is the pass key."
    a = text.find(needle_text)
    if a < 0:
        raise SystemExit("tests/passkey.py changed its needle sentence: update passkey_prompt")
    b = a + len(needle_text)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < b and e > a]
    answer = list(tok.encode(key, add_special_tokens=False))
    info = {"fillers": fillers, "depth": depth, "seed": seed, "key": key, "tokens": len(enc["input_ids"])}
    return Prompt(list(enc["input_ids"]), (inside[0], inside[-1] + 1), answer, info)


def calibration_ids(tok: Any, args: argparse.Namespace) -> tuple[list[int], dict[str, Any]]:
    """The token ids the label channels are calibrated on (never one of the measured prompts)."""
    if args.calib_source == "haystack":
        sample = make_dataset(tok, [args.calib_tokens], num_passkeys=2, passkey_length=4, seed=1234)[0]
        return sample.input_ids, {"source": "haystack", "tokens": sample.num_tokens, "seed": 1234}
    prompt = passkey_prompt(tok, 110, 0.8, seed=1234)
    return prompt.ids, {"source": "passkey", **prompt.info}


Score = tuple[str, Any, bool]
"""(score kind, (layers, Hkv, r) channels or None, FP8 labels)"""


def score_table(args: argparse.Namespace, inv_freq: torch.Tensor, labels: torch.Tensor) -> dict[str, Score]:
    """{column name: score}, oracle last."""
    layers, hkv = labels.shape[:2]
    scores: dict[str, Score] = {"quest": ("quest", None, False), "midrange": ("midrange", None, False)}

    def rope(r: int) -> torch.Tensor:
        return torch.tensor(rope_slow_channels(inv_freq, r), dtype=torch.int64).expand(layers, hkv, -1).contiguous()

    for r in args.rope_r:
        scores[f"rope{r}"] = ("rope_channels", rope(r), False)
    scores[f"label{labels.shape[2]}"] = ("label_channels", labels, False)
    for r in args.mass_r:
        scores[f"mass{r}"] = ("rope_mass", rope(r), False)
    for r in args.fp8_mass_r:
        scores[f"mass{r}f8"] = ("rope_mass", rope(r), True)
    scores["oracle"] = ("oracle", None, False)
    return scores


def measure(model: Any, prompt: Prompt, scores: dict[str, Score], args: argparse.Namespace,
            report: sr.SelectionReport) -> None:
    """Capture one prompt (its answer teacher-forced) and add its recall, ranks and needle mass."""
    answer_steps = len(prompt.answer) - 1  # the queries that predict the 2nd.. answer tokens
    ids = torch.tensor(prompt.ids + prompt.answer[:-1])
    caps = sr.capture(model, ids, args.queries + answer_steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        recall_q = list(range(args.queries))
        steps = list(range(args.queries - 1, args.queries + answer_steps))  # last prompt position, answer steps
        kw = {"page_size": args.page_size, "logical": args.logical}
        for name, (kind, chans, fp8) in scores.items():
            report.add_recall(name, sr.recall(caps, kind, args.budgets, recall_q, channels=chans, label_fp8=fp8, **kw))
            report.add_needle_rank(name, sr.needle_rank(caps, kind, prompt.needle, steps, channels=chans,
                                                        label_fp8=fp8, **kw))
        pages = sr.needle_pages(prompt.needle, args.page_size)
        report.needle_mass.append(sr.attention_on_pages(caps, pages, steps, args.page_size).tolist())
        report.page0_mass.append(sr.attention_on_pages(caps, [0], steps, args.page_size).tolist())
    finally:
        torch.set_num_threads(threads)
    report.prompts.append({**prompt.info, "needle_tokens": list(prompt.needle), "needle_pages": pages,
                           "answer_tokens": len(prompt.answer),
                           "rank_positions": [caps[0].position(i) for i in steps]})


def print_recall(report: sr.SelectionReport) -> None:
    names = list(report.recall)
    for b in report.budgets:
        print(f"\nRecall at a {b}-token budget ({b // report.page_size} pages), mean over prompts and query positions")
        print(f"{'score':>10} | {'all layers':>10} | {'layers 0-1':>10} | {'layers 2+':>9} | worst (layer, head)")
        for name in names:
            s = report.summary(name, b)
            print(f"{name:>10} | {s.overall:10.3f} | {s.first_layers:10.3f} | {s.other_layers:9.3f} | "
                  f"{s.worst:.3f} (L{s.worst_layer}, H{s.worst_head})")


def print_per_layer(report: sr.SelectionReport, budget: int) -> None:
    names = list(report.recall)
    tables = {n: report.mean_recall(n, budget).mean(1) for n in names}
    print(f"\nRecall per layer at a {budget}-token budget (mean over KV heads)")
    print("layer | " + " | ".join(f"{n:>8}" for n in names))
    for layer in range(len(tables[names[0]])):
        print(f"{layer:5d} | " + " | ".join(f"{float(tables[n][layer]):8.3f}" for n in names))


def worst_ranks(report: sr.SelectionReport, name: str, answer: bool) -> torch.Tensor:
    """(layers, Hkv): the worst needle rank over the prompts at the last prompt position (step 0),
    or over the prompts and their answer steps (steps 1..; step 0 for a one-token answer)."""
    tables = [torch.tensor(r) for r in report.needle_rank[name]]  # each (layers, Hkv, steps)
    picked = [t[:, :, 1:] if answer and t.shape[2] > 1 else t[:, :, :1] for t in tables]
    return torch.stack([t.amax(2) for t in picked]).amax(0)


def print_ranks(report: sr.SelectionReport) -> None:
    names = list(report.needle_rank)
    ranks = {n: worst_ranks(report, n, answer=False) for n in names}
    hkv = ranks[names[0]].shape[1]
    keep = BUDGET_TABLE // report.page_size - 1
    print(f"\nRank of the needle's page among the older pages at the last prompt position, worst over prompts "
          f"(read at {BUDGET_TABLE} tokens iff < {keep}); columns: score, KV heads 0..{hkv - 1}")
    print("layer | " + " | ".join(f"{n:^{4 * hkv - 1}}" for n in names))
    for layer in range(ranks[names[0]].shape[0]):
        print(f"{layer:5d} | " + " | ".join(" ".join(f"{int(x):3d}" for x in ranks[n][layer]) for n in names))
    counts = " | ".join(f"{int((ranks[n] < keep).sum()):>{4 * hkv - 1}}" for n in names)
    print(f"{'< ' + str(keep):>5} | {counts}   ((layer, head) pairs of {ranks[names[0]].numel()})")


def print_copy_heads(report: sr.SelectionReport, threshold: float) -> list[tuple[int, int]]:
    """The copy heads' attention and each score's worst needle rank over the answer steps."""
    mass = torch.stack([torch.tensor(m)[:, :, 1:].mean(2) for m in report.needle_mass]).mean(0)
    page0 = torch.stack([torch.tensor(m)[:, :, 1:].mean(2) for m in report.page0_mass]).mean(0)
    heads = [(int(lay), int(h)) for lay, h in (mass >= threshold).nonzero().tolist()]
    names = list(report.needle_rank)
    ranks = {n: worst_ranks(report, n, answer=True) for n in names}
    keep = BUDGET_TABLE // report.page_size - 1
    print(f"\nCopy heads (true attention on the needle's page >= {threshold} at the answer steps, mean over "
          f"prompts): worst rank of the needle's page over the answer steps and prompts "
          f"(read at {BUDGET_TABLE} iff < {keep})")
    print(f"{'head':>8} | {'needle':>6} | {'page 0':>6} | " + " | ".join(f"{n:>8}" for n in names))
    for lay, h in heads:
        print(f"{f'L{lay} H{h}':>8} | {float(mass[lay, h]):6.3f} | {float(page0[lay, h]):6.3f} | "
              + " | ".join(f"{int(ranks[n][lay, h]):8d}" for n in names))
    if not heads:
        print("(none)")
    return heads


def plot_ranks(report: sr.SelectionReport, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print(f"matplotlib is not installed: no figure written to {path}")
        return
    names = list(report.needle_rank)
    keep = BUDGET_TABLE // report.page_size - 1
    fig, axes = plt.subplots(2, len(names), figsize=(1.5 * len(names) + 1.5, 12), squeeze=False, sharey=True,
                             layout="constrained")
    for row, answer in enumerate((False, True)):
        for col, name in enumerate(names):
            ax = axes[row][col]
            ranks = worst_ranks(report, name, answer).numpy()
            im = ax.imshow(ranks.clip(max=3 * keep), aspect="auto", cmap="viridis_r", vmin=0, vmax=3 * keep)
            ax.set_title(name if row == 0 else f"{name}\n(answer steps)", fontsize=9)
            ax.set_xticks(range(ranks.shape[1]))
            ax.set_xlabel("KV head")
            for (y, x), v in np.ndenumerate(ranks):
                ax.text(x, y, str(v), ha="center", va="center", fontsize=5, color="k" if v < keep else "w")
        axes[row][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.6,
                 label=f"needle page rank (worst over prompts; < {keep}: read at {BUDGET_TABLE})")
    fig.suptitle(f"{MODEL}: rank of the needle's page at the last prompt position (top) and the answer steps (bottom)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    print(f"figure written to {path}")


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    llm = LLM(dtype="float32", device="cpu")
    tok = llm.get_tokenizer()
    model = llm.engine.core.model
    calib_ids, calib_info = calibration_ids(tok, args)
    calib = sr.capture(model, torch.tensor(calib_ids), min(args.calib_queries, len(calib_ids)))
    labels = sr.calibrate_label_channels(calib, args.label_r)
    del calib
    scores = score_table(args, model.rotary.inv_freq, labels)
    report = sr.SelectionReport(MODEL, args.page_size, args.logical, "sum", list(args.budgets))
    report.channels = {n: c[1].tolist() for n, c in scores.items() if c[1] is not None}
    report.settings.update({"queries": args.queries, "calibration": calib_info, "label_r": args.label_r,
                            "calib_queries": args.calib_queries})
    seed = args.seed
    for fillers in args.fillers:
        for depth in args.depths:
            measure(model, passkey_prompt(tok, fillers, depth, seed), scores, args, report)
            seed += 1
    print(f"{MODEL}, pages of {args.page_size} tokens, logical pages of {args.logical}, scores summed over each "
          f"GQA group; {len(report.prompts)} passkey prompts; recall over the last {args.queries} prompt positions")
    for pr in report.prompts:
        pages = ", ".join(map(str, pr["needle_pages"]))
        first, end = pr["needle_tokens"]
        print(f"  {pr['tokens']} tokens, {pr['fillers']} fillers, depth {pr['depth']}: needle tokens "
              f"{first}-{end - 1} (page {pages}), {pr['answer_tokens'] - 1} answer steps")
    used = min(args.calib_queries, calib_info["tokens"])
    print(f"label channels (r={args.label_r}) calibrated on the {calib_info['source']} prompt of "
          f"{calib_info['tokens']} tokens (seed {calib_info['seed']}), its last {used} positions")
    print_recall(report)
    if BUDGET_TABLE in args.budgets:
        print_per_layer(report, BUDGET_TABLE)
    print_ranks(report)
    report.settings["copy_heads"] = print_copy_heads(report, args.copy_mass)
    if args.plot is not None:
        plot_ranks(report, args.plot)
    elapsed = time.perf_counter() - t0
    report.settings["wall_s"] = round(elapsed, 1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json()))
        print(f"numbers written to {args.json}")
    print(f"wall time {elapsed:.0f} s")


if __name__ == "__main__":
    main()
