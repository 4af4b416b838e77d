"""Both attention backends with streaming heads and decode page lists, against the op references.

One engine-like run: a prefill step (a whole prompt and a chunk), then a mixed step (decodes with
page lists, a chunk after its cached prefix). The torch backend is checked against
`ops.reference`; the Triton backend against the torch backend (interpreter on a CPU).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from lserve.attention.metadata import build_metadata
from lserve.attention.sparsity import HeadSparsity
from lserve.attention.torch_backend import TorchAttentionBackend
from lserve.attention.triton_backend import TritonAttentionBackend
from lserve.kv_cache.layout import KVCacheTensors, KVShape
from lserve.ops import reference as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 5e-3 if DEVICE.type == "cuda" else 1e-4  # float32 dots are tf32 on the GPU


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run(backend_cls: type, hq: int, hkv: int, page_size: int, seed: int, use_lists: bool):
    d, layers = 32, 2
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    flags = tuple(torch.tensor([rng.random() < 0.5 for _ in range(hkv)], device=DEVICE) for _ in range(layers))
    flags = (flags[0] | torch.tensor([True] + [False] * (hkv - 1), device=DEVICE), flags[1])  # one streaming head
    sparsity = HeadSparsity(flags, prefill_sink=page_size // 2 + 3, prefill_local=page_size + 9,
                            decode_sink=5, decode_local=page_size - 3)
    kv = KVCacheTensors(KVShape(layers, hkv, d, page_size, torch.float32), 40, DEVICE)
    for t in (*kv.k, *kv.v):
        t.fill_(float("nan"))
    backend = backend_cls(kv, hq, d**-0.5, sparsity)
    pool = list(range(40))
    random.Random(seed + 1).shuffle(pool)
    prompts = [5 * page_size + 3, 3 * page_size + 7, 4 * page_size - 5]
    tables = [[pool.pop() for _ in range(-(-(n + 40) // page_size))] for n in prompts]
    outputs = []
    steps = [
        # (query lens, lengths before, num_decodes)
        ([prompts[0], prompts[1], 2 * page_size + 1], [0, 0, 0], 0),
        ([1, 1, prompts[2] - 2 * page_size - 1], [prompts[0], prompts[1], 2 * page_size + 1], 2),
    ]
    for qlens, before, nd in steps:
        seq_lens = [b + q for b, q in zip(before, qlens)]
        md = build_metadata(qlens, seq_lens, [list(t) for t in tables], nd, page_size, DEVICE)
        lists = None
        if use_lists and nd:
            width = max(len(t) for t in tables)
            page_list = torch.zeros((nd, hkv, width), dtype=torch.int32)
            page_len = torch.zeros((nd, hkv), dtype=torch.int32)
            lists = {}
            for b in range(nd):
                last = (seq_lens[b] - 1) // page_size
                for h in range(hkv):
                    chosen = sorted({last} | {p for p in range(last) if rng.random() < 0.5})
                    lists[(b, h)] = chosen
                    page_list[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                    page_len[b, h] = len(chosen)
            md = dataclasses.replace(md, decode_page_list=page_list.to(DEVICE),
                                     decode_page_list_len=page_len.to(DEVICE))
        backend.prepare(md)
        t = sum(qlens)
        step_out = []
        for layer in range(layers):
            q = torch.randn((t, hq, d), generator=gen).to(DEVICE)
            k = torch.randn((t, hkv, d), generator=gen).to(DEVICE)
            v = torch.randn((t, hkv, d), generator=gen).to(DEVICE)
            out = backend.forward(q, k, v, layer, md)
            step_out.append((q, out, lists))
        outputs.append((md, qlens, seq_lens, nd, step_out))
    return kv, sparsity, tables, outputs


@pytest.mark.parametrize("use_lists", [False, True], ids=["no-lists", "page-lists"])
@pytest.mark.parametrize("hq,hkv,page_size", [(4, 4, 16), (8, 2, 32)])
def test_backends_apply_streaming_heads_and_page_lists(hq: int, hkv: int, page_size: int, use_lists: bool) -> None:
    kv, sp, tables, torch_steps = _run(TorchAttentionBackend, hq, hkv, page_size, seed=hq + page_size,
                                       use_lists=use_lists)
    # torch backend vs the reference, on the final cache (later steps only append, so earlier
    # outputs are checked against the keys they could see: the reference cuts at seq_len)
    for md, qlens, seq_lens, nd, per_layer in torch_steps:
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        for layer, (q, out, lists) in enumerate(per_layer):
            flags = sp.streaming_heads[layer]
            if nd:
                exp = ref.sparse_decode_ref(q[:nd], kv.k[layer], kv.v[layer], seq_lens[:nd], tables[:nd],
                                            q.shape[-1] ** -0.5, flags, sp.decode_sink, sp.decode_local, lists)
                assert _rel(out[:nd], exp) < 1e-5
            pre = slice(starts[nd], starts[-1])
            exp = ref.sparse_prefill_ref(q[pre], kv.k[layer], kv.v[layer], [s - starts[nd] for s in starts[nd:]],
                                         seq_lens[nd:], tables[nd:], q.shape[-1] ** -0.5, flags,
                                         sp.prefill_sink, sp.prefill_local)
            assert _rel(out[pre], exp) < 1e-5
    _, _, _, triton_steps = _run(TritonAttentionBackend, hq, hkv, page_size, seed=hq + page_size,
                                 use_lists=use_lists)
    for (_, _, _, _, a), (_, _, _, _, b) in zip(torch_steps, triton_steps):
        for (_, out_t, _), (_, out_tr, _) in zip(a, b):
            assert _rel(out_tr, out_t) < TOL


def test_streaming_heads_change_the_output() -> None:
    """Negative: the same inputs without sparsity give a different result (no silent dense path)."""
    _, _, _, sparse_steps = _run(TorchAttentionBackend, 8, 2, 16, seed=3, use_lists=True)

    class Dense(TorchAttentionBackend):
        def __init__(self, kv, num_heads, scale, sparsity=None):  # noqa: ANN001
            super().__init__(kv, num_heads, scale, None)

    _, _, _, dense_steps = _run(Dense, 8, 2, 16, seed=3, use_lists=True)
    diffs = [_rel(a[1], b[1]) for (*_, sa), (*_, sb) in zip(sparse_steps, dense_steps) for a, b in zip(sa, sb)]
    assert min(diffs) > 1e-2
