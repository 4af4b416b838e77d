"""Prefix caching on a shared-document workload: requests that share a long document and differ
in a short question, one after another, with the prefix cache off and on (one run, side by side).

    python benchmarks/prefix_cache.py [--model MODEL] [--doc-tokens 4096] [--requests 8] [--max-tokens 8]
                                      [--device auto] [--dtype auto] [--page-size 64]

Prints per configuration the time to first token of request 1 and the median of requests 2..N,
their ratio, the total time, the tokens the cache held and the hit rate (hits / queried tokens).
Each request's first token comes from a greedy step; the outputs of both configurations are
checked to be equal.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from lserve import LLM, SamplingParams
from lserve.eval.text import prose_sentences


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[list[float], float, list[list[int]], list[int]]:
    """(time to first token per request, total seconds, outputs, cached tokens per request)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ttfts, outputs, cached = [], [], []
    start = time.perf_counter()
    for ids in prompts:
        t0 = time.perf_counter()
        rid = engine.add_request(ids, params)
        first = None
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid and first is None and out.outputs[0].token_ids:
                    first = time.perf_counter() - t0
                if out.finished:
                    final = out
        assert first is not None and final is not None
        ttfts.append(first)
        outputs.append(final.outputs[0].token_ids)
        cached.append(final.num_cached_tokens)
    return ttfts, time.perf_counter() - start, outputs, cached


def document(tok, num_tokens: int, seed: int) -> list[int]:  # noqa: ANN001 (a transformers tokenizer)
    """Generated prose, cut to `num_tokens` of the model's own tokens."""
    sentences = prose_sentences(random.Random(seed))
    text = ""
    while len(text) < num_tokens * 6:
        text += next(sentences) + " "
    return list(tok.encode(text)[:num_tokens])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--page-size", type=int, default=64)
    args = ap.parse_args()
    kw = dict(model=args.model, device=args.device, dtype=args.dtype, page_size=args.page_size)
    rows = []
    outputs = {}
    for caching in (False, True):
        llm = LLM(enable_prefix_caching=caching, **kw)
        tok = llm.get_tokenizer()
        prompts = [document(tok, args.doc_tokens, 0)
                   + tok.encode(f"\nQuestion {i}: what is said about the weather?", add_special_tokens=False)
                   for i in range(args.requests)]
        run(llm, [document(tok, args.doc_tokens, 1)], 2)  # warm-up (kernels, allocator) on another document
        llm.engine.core.scheduler.prefix_cache_hits = llm.engine.core.scheduler.prefix_cache_queries = 0
        ttfts, total, outs, cached = run(llm, prompts, args.max_tokens)
        stats = llm.engine.get_stats()
        outputs[caching] = outs
        rows.append((caching, ttfts[0], statistics.median(ttfts[1:]), total, sum(cached),
                     stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1)))
        del llm
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" \
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"{device}; model {args.model or 'default'}; document {args.doc_tokens} tokens; "
          f"{args.requests} requests one after another; {args.max_tokens} output tokens each")
    print("| prefix cache | TTFT request 1 (s) | TTFT requests 2..N, median (s) | ratio | total (s) | cached tokens | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for caching, first, rest, total, cached, rate in rows:
        print(f"| {'on' if caching else 'off'} | {first:.3f} | {rest:.3f} | {rest / first:.3f} | {total:.2f} | "
              f"{cached} | {rate:.3f} |")
    print("outputs equal:", outputs[False] == outputs[True])


if __name__ == "__main__":
    main()
