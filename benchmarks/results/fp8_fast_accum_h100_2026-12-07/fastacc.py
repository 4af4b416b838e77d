"""Probe: torch._scaled_mm with per-row scales, use_fast_accum off/on, on Llama-3-8B's projection shapes at
8,192 tokens (a prefill chunk): time, and error against the float32 product of the same E4M3 values."""
import torch, triton
from lserve.kv_cache.fp8 import quantize
print(torch.cuda.get_device_name(), torch.__version__)
M = 8192
shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
tot = {"bf16": 0.0, "fp8": 0.0, "fp8 fast": 0.0}
for name, (n, k) in shapes.items():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    xv, xs = quantize(x); wv, ws = quantize(w)
    ref = (xv.float() @ wv.float().t()) * xs[:, None] * ws[None, :]
    fns = {"bf16": lambda: x @ w.t()}
    for fast in (False, True):
        fns["fp8 fast" if fast else "fp8"] = (lambda f=fast: torch._scaled_mm(
            xv, wv.t(), scale_a=xs[:, None].contiguous(), scale_b=ws[None, :].contiguous(),
            out_dtype=torch.bfloat16, use_fast_accum=f))
    line = f"{name:8s} M={M} N={n} K={k}:"
    for key, fn in fns.items():
        try:
            out = fn()
            t = triton.testing.do_bench(fn, warmup=50, rep=300)
            tot[key] += t * 32
            err = float((out.float() - ref).norm() / ref.norm())
            line += f"  {key} {t * 1e3:.1f} us ({2 * M * n * k / t / 1e9:.0f} TFLOP/s, err {err:.1e})"
        except Exception as e:
            line += f"  {key} failed: {str(e)[:120]}"
    print(line)
print("per chunk (32 layers, ms):", {k: round(v, 1) for k, v in tot.items()})
