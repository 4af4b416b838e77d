"""Probe: does FP8 Q.K^T (and FP8 P.V) make a causal FlashAttention-2 Triton kernel faster on this GPU?
Same simple kernel (pointer loads, causal, GQA), three variants; checks each against torch SDPA and times them.
    python .gpu/fp8qk.py [--n 32768] [--small]   (TRITON_INTERPRET=1 with --small on a CPU)"""
import argparse, os
import torch, triton, triton.language as tl

FP8 = torch.float8_e4m3fn


@triton.jit
def _fa(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, o_ptr, N, qk_scale,
        GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    # MODE 0: bf16; 1: FP8 Q.K^T (row scales of q, token scales of k), bf16 P.V; 2: also FP8 P.V (v as (D, N));
    # 3: FP8 Q.K^T and FP8 V (token scales folded into p) converted to bf16 for P.V (an FP8 KV cache)
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BM
    h = tl.program_id(1)
    kvh = h // GROUP
    rows = m0 + tl.arange(0, BM)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (h * N + rows)[:, None] * D + d[None, :], mask=(rows < N)[:, None], other=0.0)
    if MODE > 0:
        qs = tl.load(qs_ptr + h * N + rows, mask=rows < N, other=1.0) * qk_scale  # mode 4: ones
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    hi = tl.minimum(m0 + BM, N)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        k = tl.load(k_ptr + (kvh * N + cols)[:, None] * D + d[None, :], mask=(cols < N)[:, None], other=0.0)
        if MODE == 4:  # bf16 q, FP8 K converted in registers (an FP8 KV cache read by a bf16 kernel)
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        else:
            s = tl.dot(q, tl.trans(k))
        if MODE > 0:
            ks = tl.load(ks_ptr + kvh * N + cols, mask=cols < N, other=0.0)
            s = s * qs[:, None] * ks[None, :]
        else:
            s = s * qk_scale
        if n0 + BN > m0:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MODE >= 3:  # FP8 V with per-token scales, folded into p; the product in bf16
            v8 = tl.load(v_ptr + (kvh * N + cols)[:, None] * D + d[None, :], mask=(cols < N)[:, None], other=0.0)
            vsc = tl.load(vs_ptr + kvh * N + cols, mask=cols < N, other=0.0)
            acc = acc * alpha[:, None] + tl.dot((p * vsc[None, :]).to(o_ptr.dtype.element_ty), v8.to(o_ptr.dtype.element_ty))
        elif MODE == 2:
            vt = tl.load(v_ptr + (kvh * D + d)[:, None] * N + cols[None, :], mask=(cols < N)[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), tl.trans(vt))
        else:
            v = tl.load(v_ptr + (kvh * N + cols)[:, None] * D + d[None, :], mask=(cols < N)[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + (h * N + rows)[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=(rows < N)[:, None])


def quant_rows(x):
    amax = x.float().abs().amax(-1).clamp(min=1e-12)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    return (x.float() / scale[..., None]).to(FP8), scale.float()


def run(mode, q, k, v, bm, bn, warps, stages):
    hq, n, d = q.shape
    group = hq // k.shape[0]
    o = torch.empty_like(q)
    scale = d ** -0.5 * 1.4426950408889634
    if mode == 0:
        args = (q, k, v, q, q, q)
    else:
        q8, qs = quant_rows(q)
        k8, ks = quant_rows(k)
        if mode == 1:
            args = (q8, k8, v, qs, ks, ks)
        elif mode >= 3:
            v8, vs3 = quant_rows(v)
            args = (q8, k8, v8, qs, ks, vs3) if mode == 3 else (q, k8, v8, torch.ones_like(qs), ks, vs3)
        else:  # V per tensor (a speed probe): (Hkv, D, N) so that the product's reduction dim is contiguous
            vs = v.float().abs().amax() / 448.0
            args = (q8, k8, (v.float() / vs).to(FP8).transpose(1, 2).contiguous(), qs, ks, ks)
    grid = (triton.cdiv(n, bm), hq)
    fn = lambda: _fa[grid](*args, o, n, scale, GROUP=group, D=d, BM=bm, BN=bn, MODE=mode,
                           num_warps=warps, num_stages=stages)
    fn()
    if mode == 2:
        o.mul_(vs)  # the per-tensor V scale (outside the timing: a probe)
    return o, fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hq, hkv, d, n = (4, 2, 64, 200) if a.small else (32, 8, 128, a.n)
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    q = torch.randn(hq, n, d, generator=g).to(dev, dt)
    k = torch.randn(hkv, n, d, generator=g).to(dev, dt)
    v = torch.randn(hkv, n, d, generator=g).to(dev, dt)
    # bf16 SDPA as the reference on the GPU (a float32 one at 32K does not fit); its own error is ~1e-3
    rdt = torch.float32 if dev == "cpu" else dt
    # flash SDPA wants 4-D inputs and no GQA
    kx, vx = (t.repeat_interleave(hq // hkv, 0).to(rdt)[None] for t in (k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q.to(rdt)[None], kx, vx, is_causal=True)[0].float()
    flops = 4 * hq * n * n * d / 2
    configs = [(16, 16, 4, 1)] if a.small else [(128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 4, 2),
                                                 (128, 128, 8, 3), (64, 64, 4, 3)]
    if dev == "cuda":
        print(torch.cuda.get_device_name(), f"hq={hq} hkv={hkv} d={d} n={n}, causal; ms and TFLOP/s")
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q[None], kx, vx, is_causal=True)
        t = triton.testing.do_bench(sdpa)
        print(f"SDPA bf16: {t:.3f} ms {flops / t / 1e9:.0f} TFLOP/s")
    for mode, name in ((0, "bf16"), (1, "fp8 QK, bf16 PV"), (2, "fp8 QK and PV"), (3, "fp8 QK, V fp8->bf16"),
                       (4, "bf16 q, fp8 K/V->bf16")):
        for bm, bn, w, st in configs:
            try:
                o, fn = run(mode, q, k, v, bm, bn, w, st)
                err = float((o.float() - ref).norm() / ref.norm())
                if dev == "cuda":
                    t = triton.testing.do_bench(fn)
                    print(f"{name:16s} BM={bm} BN={bn} warps={w} stages={st}: {t:.3f} ms {flops / t / 1e9:.0f} TFLOP/s"
                          f"  rel err {err:.2e}")
                else:
                    print(f"{name:16s} rel err {err:.2e}")
            except Exception as e:  # a tiling the GPU cannot fit
                print(f"{name:16s} BM={bm} BN={bn} warps={w} stages={st}: failed: {str(e)[:100]}")


if __name__ == "__main__":
    main()
