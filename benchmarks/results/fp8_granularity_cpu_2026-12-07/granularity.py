"""Simulated FP8 (E4M3) weight/activation quantization granularity vs perplexity, default model, float32, CPU.

    .venv/bin/python benchmarks/results/fp8_granularity_cpu_2026-12-07/granularity.py W A

Every projection but the LM head (120 of SmolLM2-135M) has its weight rounded to E4M3 and back with one scale per
W block (chan: per output channel, what quantization=fp8 does; g64 / g32: 1 x 64 / 1 x 32 groups along the input;
b64: 64 x 64 tiles; none) and its input rounded likewise per A block (tok: per token, as the engine does; g64, g32;
none). The matmuls stay float32: only the rounding is simulated. Perplexity as benchmarks/perplexity.py computes
it (GPL-3 text, 2,048-token windows). SmolLM2's hidden size (576) is no multiple of 128, so groups are 64 or 32."""
import sys, math, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from perplexity import score
from lserve import LLM
from lserve.model.layers import Linear

F8 = torch.float8_e4m3fn
def fq(x, dim_groups):  # fake-quantize x (rows, cols) with one scale per block (rows_per, cols_per)
    r, c = dim_groups
    R, C = x.shape
    rr = R if r is None else r
    cc = C if c is None else c
    xp = x.reshape(R // rr, rr, C // cc, cc)
    amax = xp.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)
    s = amax / 448.0
    return ((xp / s).to(F8).float() * s).reshape(R, C)

mode_w, mode_a = sys.argv[1], sys.argv[2]
llm = LLM(dtype="float32", device="cpu")
model = llm.llm_engine.core.model
W = {"chan": (1, None), "b64": (64, 64), "g64": (1, 64), "g32": (1, 32), "none": None}[mode_w]
A = {"tok": (1, None), "g64": (1, 64), "g32": (1, 32), "none": None}[mode_a]
n = 0
for name, m in model.named_modules():
    if isinstance(m, Linear) and "lm_head" not in name and "embed" not in name:
        w = m.weight.data
        if W is not None:
            if w.shape[0] % W[0]:
                raise SystemExit(f"{name} {tuple(w.shape)} not a multiple of 128 rows")
            m.weight.data = fq(w.float(), W).to(w.dtype)
        if A is not None:
            orig = m.forward
            def fwd(x, orig=orig):
                shp = x.shape
                return orig(fq(x.reshape(-1, shp[-1]).float(), A).reshape(shp).to(x.dtype))
            m.forward = fwd
        n += 1
text = open("/usr/share/common-licenses/GPL-3").read()
ids = llm.get_tokenizer().encode(text)
windows = [ids[i:i + 2048] for i in range(0, len(ids) - 2048 + 1, 2048)]
lp, _ = score(llm, windows)
print(f"W={mode_w} A={mode_a} linears={n} ppl={math.exp(-sum(lp)/len(lp)):.4f} tokens={len(lp)}", flush=True)
