"""GPU perplexity of the default model, bfloat16 vs FP8 weights (+ FP8 KV), with the FP8 products' fast
accumulation (the engine's) and without it (torch._scaled_mm patched to use_fast_accum=False)."""
import sys, runpy, torch
args = sys.argv[1:]
mode = args.pop(0)
if mode == "exact":
    real = torch._scaled_mm
    def exact(*a, **kw):
        kw["use_fast_accum"] = False
        return real(*a, **kw)
    torch._scaled_mm = exact
sys.argv = ["perplexity.py"] + args
runpy.run_path("benchmarks/perplexity.py", run_name="__main__")
