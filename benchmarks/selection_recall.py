"""How much true attention the page selection keeps, on the default model (CPU, a few minutes).

    python benchmarks/selection_recall.py [--fillers 140] [--budget 512] [--queries 16]

Runs the default model (SmolLM2-135M-Instruct) over a passkey prompt with exact attention and,
for the last `--queries` positions of the prompt taken as decode queries, measures the *recall*
of a page selection: the share of each query head's true softmax attention that falls on the
selected pages. Pages of 64 tokens, logical pages of 16 (LServe's hierarchical paging), a
`--budget`-token budget (the newest page always included). Compared: one selection per KV head
shared by its GQA group with scores aggregated by max or by sum; a selection per query head (not
what the kernels do: a group's heads would read different pages); and the oracle (top pages by
true attention). Also per layer, to see whether keeping the first layers dense (Quest) helps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lserve import LLM  # noqa: E402
from tests.passkey import passkey_messages  # noqa: E402

PAGE, LOGICAL = 64, 16


def quest_page_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q (G, D), keys (L, D) -> (G, pages): per query head, the Quest bound of each page (max over its
    logical pages of sum_c max(q_c kmax_c, q_c kmin_c))."""
    n = keys.shape[0]
    pad = -n % LOGICAL
    blocks = F.pad(keys, (0, 0, 0, pad)).view(-1, LOGICAL, keys.shape[1])
    valid = (torch.arange(blocks.shape[0] * LOGICAL) < n).view(-1, LOGICAL, 1)
    kmax = blocks.masked_fill(~valid, float("-inf")).amax(1)
    kmin = blocks.masked_fill(~valid, float("inf")).amin(1)
    bound = torch.maximum(q[:, None, :] * kmax[None], q[:, None, :] * kmin[None]).sum(-1)  # (G, logical)
    sub = PAGE // LOGICAL
    pad_l = -bound.shape[1] % sub
    bound = F.pad(bound, (0, pad_l), value=float("-inf")).view(q.shape[0], -1, sub)
    return bound.amax(-1)


def choose(scores: torch.Tensor, keep: int) -> set[int]:
    """Top `keep` older pages of a (pages,) score row plus the newest page."""
    newest = scores.shape[0] - 1
    older = scores[:newest]
    top = older.topk(min(keep, newest)).indices.tolist() if newest else []
    return set(top) | {newest}


def recall(probs: torch.Tensor, pages: set[int]) -> float:
    """Share of a (L,) attention distribution on the chosen pages."""
    idx = torch.tensor(sorted(pages))
    per_page = F.pad(probs, (0, -probs.shape[0] % PAGE)).view(-1, PAGE).sum(-1)
    return float(per_page[idx].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fillers", type=int, default=140, help="filler sentences (~21 tokens each)")
    parser.add_argument("--budget", type=int, default=512, help="token budget (pages of 64 tokens)")
    parser.add_argument("--queries", type=int, default=16, help="last prompt positions used as decode queries")
    args = parser.parse_args()
    llm = LLM(dtype="float32", device="cpu")
    tok = llm.get_tokenizer()
    messages, _key = passkey_messages(args.fillers, seed=0, depth=0.37)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    model = llm.engine.core.model
    arch = llm.engine.core.arch
    group = arch.num_heads // arch.num_kv_heads
    keep = args.budget // PAGE - 1
    scale = arch.head_dim**-0.5
    methods = ("max", "sum", "per-query-head", "oracle")
    per_layer: dict[str, list[list[float]]] = {m: [[] for _ in range(arch.num_layers)] for m in methods}

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=True)
        n = q.shape[0]
        for i in range(n - args.queries, n):
            keys = k[: i + 1].float()
            for h in range(arch.num_kv_heads):
                qg = q[i, h * group : (h + 1) * group].float()  # (G, D)
                probs = torch.softmax((qg @ keys[:, h].T) * scale, dim=-1)  # (G, L)
                bound = quest_page_scores(qg, keys[:, h])  # (G, pages)
                shared = {"max": choose(bound.amax(0), keep), "sum": choose(bound.sum(0), keep)}
                for m, pages in shared.items():
                    per_layer[m][layer].append(sum(recall(p, pages) for p in probs) / group)
                per_layer["per-query-head"][layer].append(
                    sum(recall(p, choose(b, keep)) for p, b in zip(probs, bound)) / group)
                oracle = F.pad(probs, (0, -probs.shape[1] % PAGE)).view(group, -1, PAGE).sum(-1)
                per_layer["oracle"][layer].append(
                    sum(recall(p, choose(o, keep)) for p, o in zip(probs, oracle)) / group)
        return out[0].transpose(0, 1)

    with torch.inference_mode():
        model(ids, torch.arange(ids.shape[0]), attn)
    mean = {m: [sum(v) / len(v) for v in per_layer[m]] for m in methods}
    pages = -(-ids.shape[0] // PAGE)
    print(f"SmolLM2-135M-Instruct, passkey prompt of {ids.shape[0]} tokens ({pages} pages of {PAGE}), budget "
          f"{args.budget} tokens ({keep + 1} pages), logical pages of {LOGICAL}, last {args.queries} positions")
    print(f"{'selection':>16} | {'all layers':>10} | {'layers 0-1':>10} | {'layers 2+':>9} | {'worst layer':>11}")
    for m in methods:
        v = mean[m]
        worst = min(range(len(v)), key=v.__getitem__)
        print(f"{m:>16} | {sum(v) / len(v):10.3f} | {sum(v[:2]) / 2:10.3f} | {sum(v[2:]) / len(v[2:]):9.3f} | "
              f"{v[worst]:.3f} (L{worst})")
    print("per layer (max):", " ".join(f"{x:.2f}" for x in mean["max"]))


if __name__ == "__main__":
    main()
