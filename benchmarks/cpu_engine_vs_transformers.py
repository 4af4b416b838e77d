"""Prefill and decode throughput of lserve next to Hugging Face transformers, same model, same run.

    python benchmarks/cpu_engine_vs_transformers.py [--lengths 1024,4096] [--batches 1,8]

Both engines load the default model (SmolLM2-135M-Instruct, dequantised from its GGUF) in
float32 on the CPU and generate greedily from the same random prompts with EOS ignored. Prefill
throughput = prompt tokens of the batch / time until every request has its first token; decode
throughput = tokens generated after that / the remaining time. Each cell is the best of
`--repeats` runs (this machine is shared and noisy), the engines alternating.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def _prompts(length: int, batch: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (length,), generator=gen).tolist() for _ in range(batch)]


def run_lserve(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds until all first tokens, seconds for the rest) through the engine's step loop."""
    from lserve import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    have_first: set[str] = set()
    first_all = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            have_first.add(out.request_id)
        if first_all is None and len(have_first) == len(prompts):
            first_all = time.perf_counter()
    end = time.perf_counter()
    assert first_all is not None
    return first_all - start, end - first_all


def run_transformers(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """Same split for `model.generate`, timed by a logits processor called once per new token."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):  # noqa: ANN001, D102
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0,
        )
    end = time.perf_counter()
    return stamps[0] - start, end - stamps[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lserve import LLM
    from lserve.model.loader import default_model_path

    hf_logging.set_verbosity_error()
    llm = LLM(dtype="float32", device="cpu")
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    print(f"# CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model SmolLM2-135M-Instruct float32; {args.new_tokens} new tokens; "
          f"best of {args.repeats}")
    header = ("prompt", "batch", "lserve prefill tok/s", "HF prefill tok/s", "ratio",
              "lserve decode tok/s", "HF decode tok/s", "ratio")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for length in [int(x) for x in args.lengths.split(",")]:
        for batch in [int(x) for x in args.batches.split(",")]:
            prompts = _prompts(length, batch, seed=length + batch)
            best = {"lserve": [float("inf")] * 2, "hf": [float("inf")] * 2}
            for _ in range(args.repeats):
                for name, fn, obj in (("lserve", run_lserve, llm), ("hf", run_transformers, hf)):
                    pre, dec = fn(obj, prompts, args.new_tokens)
                    best[name] = [min(best[name][0], pre), min(best[name][1], dec)]
            ptoks, dtoks = length * batch, (args.new_tokens - 1) * batch
            lp, hp = ptoks / best["lserve"][0], ptoks / best["hf"][0]
            ld, hd = dtoks / best["lserve"][1], dtoks / best["hf"][1]
            print(f"| {length} | {batch} | {lp:.0f} | {hp:.0f} | {lp / hp:.2f} | {ld:.1f} | {hd:.1f} | {ld / hd:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
