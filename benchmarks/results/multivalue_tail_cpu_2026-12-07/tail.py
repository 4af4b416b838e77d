"""Concept test: compensate the pages a selection drops by page centroids (CPU, float32).
mode oracle: each dropped page's exact exp-mass, its mean V; centroid: count*exp(q.kbar), mean V."""
import os, sys, time
import torch, torch.nn.functional as F
import lserve.attention.torch_backend as tb
from lserve.attention.torch_backend import gather_kv, listed_pages_mask

MODE = os.environ.get("TAIL", "none")
orig = tb.TorchAttentionBackend._decode

def _decode(self, call, q, md, lists):
    if lists is None or call.window is not None or MODE == "none":
        return orig(self, call, q, md, lists)
    out = orig(self, call, q, md, lists)  # streaming heads and shapes as the engine does
    n = md.num_decodes
    length = max(md.seq_lens_cpu[:n])
    P = md.page_size
    keys, values = gather_kv(call, call.page_table[:n, : -(-length // P)], length, q.dtype)
    hkv = keys.shape[1]
    streaming = call.streaming
    kv_idx = torch.arange(hkv) if streaming is None else torch.arange(hkv)[~streaming.bool()]
    if len(kv_idx) == 0:
        return out
    q_idx = self._q_heads(kv_idx, hkv, q.shape[1])
    g = len(q_idx) // len(kv_idx)
    pos = torch.arange(length)
    for i in range(n):
        L = md.seq_lens_cpu[i]
        K = keys[i, kv_idx, :L].repeat_interleave(g, 0)  # (h, L, D)
        V = values[i, kv_idx, :L].repeat_interleave(g, 0)
        qs = q[i, q_idx]  # (h, D)
        s = torch.einsum("hd,hld->hl", qs, K) * self.scale
        sel = listed_pages_mask(lists[0][i:i+1, kv_idx], lists[1][i:i+1, kv_idx], P, length)[0, :, :L]
        sel = sel.repeat_interleave(g, 0)
        m = s.max(dim=1, keepdim=True).values
        e = torch.exp(s - m)
        num = torch.einsum("hl,hld->hd", e * sel, V)
        den = (e * sel).sum(1)
        tail = ~sel
        npg = -(-L // P)
        pid = (pos[:L] // P)
        # per page sums over tail tokens
        cnt = torch.zeros(len(q_idx), npg).index_add_(1, pid, tail.float())
        vsum = torch.zeros(len(q_idx), npg, V.shape[-1]).index_add_(1, pid, V * tail[..., None])
        vbar = vsum / cnt.clamp(min=1)[..., None]
        if MODE == "oracle":
            M = torch.zeros(len(q_idx), npg).index_add_(1, pid, e * tail)
        else:
            ksum = torch.zeros(len(q_idx), npg, K.shape[-1]).index_add_(1, pid, K * tail[..., None])
            kbar = ksum / cnt.clamp(min=1)[..., None]
            logit = torch.einsum("hd,hpd->hp", qs, kbar) * self.scale
            if MODE == "diag":
                k2 = torch.zeros(len(q_idx), npg, K.shape[-1]).index_add_(1, pid, K * K * tail[..., None])
                var = (k2 / cnt.clamp(min=1)[..., None] - kbar * kbar).clamp(min=0)
                logit = logit + 0.5 * torch.einsum("hd,hpd->hp", qs * qs, var) * self.scale ** 2
            M = cnt * torch.exp(logit - m)
            M = M * (cnt > 0)
        num = num + torch.einsum("hp,hpd->hd", M, vbar)
        den = den + M.sum(1)
        out[i, q_idx] = num / den[:, None]
    return out

tb.TorchAttentionBackend._decode = _decode

from lserve import LLM, SamplingParams
from lserve.eval.sample import PromptFormat
from lserve.eval.system import load_tokenizer_for
from lserve.eval.ruler import make_ruler_samples
from lserve.eval.scoring import score

fmt = PromptFormat(load_tokenizer_for({}), chat=None)
samples = make_ruler_samples(fmt, [4096], ["niah_multivalue"], 19, 0)
pick = [int(x) for x in sys.argv[1].split(",")]
samples = [s for s in samples if s.index in pick]
b = int(sys.argv[2])
kw = dict(page_score="rope_mass", selector_interval=1, page_size=16, selection_local_tokens=128,
          score_channels=64, token_budget=b)
t = time.time()
llm = LLM(dtype="float32", max_num_seqs=8, **kw)
outs = llm.generate([{"prompt_token_ids": s.prompt_ids} for s in samples],
                    SamplingParams(temperature=0, max_tokens=samples[0].max_tokens), use_tqdm=False)
tot = 0
for s, o in zip(samples, outs):
    text = o.outputs[0].text
    sc = score(s.scorer, text, s.answers); tot += sc
    print(f"{MODE} b={b} {s.index}: {sc:.2f} {text[:90]!r}")
print(f"{MODE} b={b} sum {tot:.2f} ({time.time()-t:.0f}s)", flush=True)
