"""The longest single request the engine admits on this GPU, per configuration, side by side.

    python benchmarks/capacity.py --compare dense: \
        --compare stream50:streaming_sparsity=0.5,attn_pattern=random \
        --compare stream50-kv8:streaming_sparsity=0.5,attn_pattern=random,kv_cache_dtype=fp8 \
        --compare stream50-kv8-w8:streaming_sparsity=0.5,attn_pattern=random,kv_cache_dtype=fp8,quantization=fp8

Each configuration builds the engine as a user would (`LLM(...)`, the default share of free GPU
memory for the KV cache) for one request at a time (`max_num_seqs=1`) on a dummy model whose
window is lifted to `--max-model-len`, then reads what its memory plan gave: weight bytes, KV
pages, KV bytes per token, and the longest request it admits (prompt + output tokens), checked
with the engine's own admission (`EngineCore.make_request`: that length is accepted, one page
more is rejected). Nothing is generated.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from lserve import LLM, SamplingParams
from lserve.bench.command import with_random_pattern
from lserve.errors import RequestRejected
from lserve.eval.options import check_engine_settings, parse_compare_list, parse_size
from lserve.eval.system import hardware_description, model_info


def weight_bytes(model: torch.nn.Module) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    scales = [m.weight_scale for m in model.modules() if getattr(m, "weight_scale", None) is not None]
    return total + sum(s.numel() * s.element_size() for s in scales)


def admits(core, tokens: int) -> bool:
    try:
        core.make_request("probe", [0] * (tokens - 1), SamplingParams(max_tokens=1, ignore_eos=True), frozenset())
    except RequestRejected:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama-3-8b-262k")
    ap.add_argument("--max-model-len", default="16m", help="the window the dummy model is given")
    ap.add_argument("--compare", action="append", help="NAME:field=value,...")
    ap.add_argument("--output-json", type=Path, default=None)
    args = ap.parse_args()
    limit = parse_size(args.max_model_len, "max-model-len")
    base = {"model": args.model, "max_num_seqs": 1, "max_model_len": limit}
    specs = parse_compare_list(args.compare)
    check_engine_settings(base, specs)
    print(f"# {hardware_description()}; {args.model}, window lifted to {limit} tokens, max_num_seqs=1")
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="lserve-capacity-"))
    arch = model_info(base, [s.overrides for s in specs]).arch
    for spec in specs:
        llm = LLM(**{**base, **with_random_pattern(spec, arch, folder, seed=0).overrides})
        core = llm.engine.core
        page = core.kv_cache.shape.page_size
        longest = min(core.kv_manager.num_pages * page, limit)
        assert admits(core, longest) and (longest == limit or not admits(core, longest + page)), spec.name
        per_token = core.kv_bytes_per_sequence(longest) / longest
        row = {"name": spec.name, "overrides": spec.overrides, "weight_bytes": weight_bytes(core.model),
               "kv_pages": core.kv_manager.num_pages, "seats": core.num_seats, "kv_bytes_per_token": per_token, "longest_request": longest,
               "kv_dtype": str(core.kv_cache.shape.kv_dtype).replace("torch.", "")}
        rows.append(row)
        print(f"{spec.describe()}: {row}", flush=True)
        del llm, core
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n| config | weights GiB | KV dtype | KV KiB/token | KV pages | longest request (tokens) | vs first |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['weight_bytes'] / 2**30:.2f} | {r['kv_dtype']} | {r['kv_bytes_per_token'] / 1024:.1f} "
              f"| {r['kv_pages']} | {r['longest_request']:,} | {r['longest_request'] / rows[0]['longest_request']:.2f}x |")
    if args.output_json:
        args.output_json.write_text(json.dumps({"hardware": hardware_description(), "model": args.model,
                                                "max_model_len": limit, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
