"""TorchAttentionBackend against a plain, independent attention reference.

The simulation drives the backend the way the engine does: sequences of odd lengths, page tables
drawn from a shuffled pool (gaps, out of order, page 0 included), chunked prefill mixed with
decodes in one batch (decodes first), then decode-only batches of different context lengths.
The KV cache starts poisoned with NaN, so any read of an unwritten slot shows up in the output.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch

from lserve.attention.metadata import AttentionMetadata, build_metadata
from lserve.attention.torch_backend import TorchAttentionBackend, write_kv
from lserve.kv_cache.fp8 import FP8_DTYPE, as_bytes, dequantize, quantize
from lserve.kv_cache.layout import KVCacheTensors, KVShape

CPU = torch.device("cpu")
NAN = float("nan")


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q (qlen, Hq, D) are the last qlen positions of a sequence whose full K/V are (L, Hkv, D)."""
    qlen, hq, _ = q.shape
    length, hkv, _ = keys.shape
    assert hq % hkv == 0
    rep = hq // hkv  # query head h reads KV head h // rep
    k64 = keys.double().repeat_interleave(rep, dim=1)
    v64 = values.double().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k64) * scale
    qpos = torch.arange(length - qlen, length, device=q.device)[:, None]
    kpos = torch.arange(length, device=q.device)[None, :]
    scores = scores.masked_fill(~(kpos <= qpos), -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v64)


@dataclass
class Seq:
    prompt_len: int
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose K/V are in the cache
    k_hist: list[list[torch.Tensor]] = field(default_factory=list)  # per layer, chunks of (n, Hkv, D)
    v_hist: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def prefill_left(self) -> int:
        return max(0, self.prompt_len - self.length)


@dataclass
class Step:
    md: AttentionMetadata
    plan: list[tuple[int, int]]  # (sequence index, query length), decodes first
    q: list[torch.Tensor]  # per layer (T, Hq, D)
    k: list[torch.Tensor]
    v: list[torch.Tensor]


class Sim:
    """A paged KV cache, a backend over it, and the true K/V history of every sequence."""

    def __init__(
        self, *, num_layers: int, hq: int, hkv: int, head_dim: int, page_size: int, num_pages: int,
        dtype: torch.dtype, seed: int, backend_cls: type = TorchAttentionBackend, device: torch.device = CPU,
        fp8: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.num_layers, self.hq, self.hkv, self.head_dim = num_layers, hq, hkv, head_dim
        self.page_size, self.dtype = page_size, dtype
        self.device = device
        self.fp8 = fp8
        shape = KVShape(num_layers, hkv, head_dim, page_size, dtype, cache_dtype=FP8_DTYPE if fp8 else None)
        self.kv = KVCacheTensors(shape, num_pages, device)
        for t in (*self.kv.k, *self.kv.v):
            as_bytes(t).fill_(0x7F if fp8 else NAN)  # (0x7F: E4M3's NaN)
        for t in (*(self.kv.k_scale or []), *(self.kv.v_scale or [])):
            t.fill_(NAN)
        self.scale = head_dim**-0.5
        self.backend = backend_cls(self.kv, hq, self.scale)
        self.free = list(range(num_pages))
        self.rng.shuffle(self.free)
        self.seqs: list[Seq] = []

    def add_seq(self, prompt_len: int) -> int:
        s = Seq(prompt_len)
        s.k_hist = [[] for _ in range(self.num_layers)]
        s.v_hist = [[] for _ in range(self.num_layers)]
        self.seqs.append(s)
        return len(self.seqs) - 1

    def used_pages(self) -> set[int]:
        return {p for s in self.seqs for p in s.pages}

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.dtype).to(self.device)

    def prepare(self, plan: list[tuple[int, int]], num_decodes: int) -> Step:
        """Allocate pages and draw this step's q/k/v; nothing is run yet."""
        assert all(qlen == 1 for _, qlen in plan[:num_decodes])
        assert all(self.seqs[i].prefill_left == 0 for i, _ in plan[:num_decodes])
        for i, qlen in plan:
            s = self.seqs[i]
            while len(s.pages) * self.page_size < s.length + qlen:
                s.pages.append(self.free.pop())
        md = build_metadata(
            [qlen for _, qlen in plan],
            [self.seqs[i].length + qlen for i, qlen in plan],
            [list(self.seqs[i].pages) for i, _ in plan],
            num_decodes,
            self.page_size,
            self.device,
        )
        t = md.num_tokens
        q = [self._randn(t, self.hq, self.head_dim) for _ in range(self.num_layers)]
        k = [self._randn(t, self.hkv, self.head_dim) for _ in range(self.num_layers)]
        v = [self._randn(t, self.hkv, self.head_dim) for _ in range(self.num_layers)]
        return Step(md, plan, q, k, v)

    def run(self, step: Step) -> list[torch.Tensor]:
        self.backend.prepare(step.md)
        return [
            self.backend.forward(step.q[layer], step.k[layer], step.v[layer], layer, step.md)
            for layer in range(self.num_layers)
        ]

    def reference(self, step: Step) -> list[list[torch.Tensor]]:
        """Per layer, per planned sequence: the reference output (float64)."""
        out: list[list[torch.Tensor]] = []
        for layer in range(self.num_layers):
            per_seq = []
            start = 0
            for i, qlen in step.plan:
                s = self.seqs[i]
                sl = slice(start, start + qlen)
                keys = self.stored(torch.cat([*s.k_hist[layer], step.k[layer][sl]]))
                values = self.stored(torch.cat([*s.v_hist[layer], step.v[layer][sl]]))
                per_seq.append(reference_attention(step.q[layer][sl].float(), keys, values, self.scale))
                start += qlen
            out.append(per_seq)
        return out

    def stored(self, x: torch.Tensor) -> torch.Tensor:
        """What the cache gives back for K or V rows x, in float32 (an FP8 cache: dequantized)."""
        return dequantize(*quantize(x), torch.float32) if self.fp8 else x.float()

    def commit(self, step: Step) -> None:
        start = 0
        for i, qlen in step.plan:
            s = self.seqs[i]
            for layer in range(self.num_layers):
                s.k_hist[layer].append(step.k[layer][start : start + qlen].clone())
                s.v_hist[layer].append(step.v[layer][start : start + qlen].clone())
            s.length += qlen
            start += qlen

    def check_cache(self) -> None:
        """Every cached token is at its slot, bit for bit, in its own layer."""
        for s in self.seqs:
            if not s.length:
                continue
            pos = torch.arange(s.length)
            slots = torch.tensor(s.pages)[pos // self.page_size] * self.page_size + pos % self.page_size
            slots = slots.to(self.device)
            for layer in range(self.num_layers):
                for cache, scales, hist in ((self.kv.k, self.kv.k_scale, s.k_hist), (self.kv.v, self.kv.v_scale, s.v_hist)):
                    flat = as_bytes(cache[layer]).view(-1, self.hkv, self.head_dim)
                    expected = torch.cat(hist[layer])
                    if scales is not None:  # FP8: the quantized bytes and the scales, bit for bit
                        expected, expected_scales = quantize(expected)
                        page_of, offset = slots // self.page_size, slots % self.page_size
                        assert torch.equal(scales[layer][page_of, :, offset], expected_scales)
                    assert torch.equal(flat[slots], as_bytes(expected))

    def plan_step(self, seq_ids: list[int], first: bool = False) -> tuple[list[tuple[int, int]], int]:
        """Decodes for finished prompts, prefill chunks (whole rest or a random part) for the others."""
        decodes, prefills = [], []
        for n, i in enumerate(seq_ids):
            left = self.seqs[i].prefill_left
            if left == 0:
                decodes.append((i, 1))
                continue
            whole = (n % 2 == 0) if first else self.rng.random() < 0.5
            qlen = left if whole or left == 1 else self.rng.randrange(1, left)
            prefills.append((i, qlen))
        self.rng.shuffle(decodes)
        self.rng.shuffle(prefills)
        return decodes + prefills, len(decodes)


def odd_length(rng: random.Random, page_size: int, low: int, high: int) -> int:
    while True:
        n = rng.randrange(low, high) | 1
        if n % page_size:
            return n


def assert_matches(sim: Sim, step: Step, outs: list[torch.Tensor], atol: float, rtol: float) -> None:
    refs = sim.reference(step)
    for layer, out in enumerate(outs):
        assert out.shape == step.q[layer].shape
        assert out.dtype == sim.dtype
        assert not torch.isnan(out).any(), f"NaN in layer {layer} output: an unwritten slot was read"
        start = 0
        for (i, qlen), ref in zip(step.plan, refs[layer]):
            got = out[start : start + qlen].float()
            torch.testing.assert_close(
                got, ref.float(), atol=atol, rtol=rtol,
                msg=lambda m, i=i, qlen=qlen, layer=layer: f"seq {i} (qlen {qlen}, layer {layer}): {m}",
            )
            start += qlen


def run_scenario(
    *, hq: int, hkv: int, head_dim: int, page_size: int, dtype: torch.dtype, atol: float, rtol: float,
    seed: int, num_seqs: int = 6, num_layers: int = 3, steps: int = 7,
    backend_cls: type = TorchAttentionBackend, device: torch.device = CPU, fp8: bool = False,
) -> Sim:
    rng = random.Random(seed)
    lengths = [odd_length(rng, page_size, 3, 3 * page_size) for _ in range(num_seqs)]
    need = sum(-(-(n + steps) // page_size) for n in lengths)
    sim = Sim(
        num_layers=num_layers, hq=hq, hkv=hkv, head_dim=head_dim, page_size=page_size,
        num_pages=2 * need + 5, dtype=dtype, seed=seed, backend_cls=backend_cls, device=device, fp8=fp8,
    )
    ids = [sim.add_seq(n) for n in lengths]
    saw_mixed = saw_ragged_decode = False
    for n in range(steps):
        plan, num_decodes = sim.plan_step(ids, first=n == 0)
        step = sim.prepare(plan, num_decodes)
        if n == 0:
            assert num_decodes == 0
            assert any(q == sim.seqs[i].prompt_len for i, q in plan)  # whole prompts
            assert any(q < sim.seqs[i].prompt_len for i, q in plan)  # partial chunks
        saw_mixed |= 0 < num_decodes < len(plan)
        dec_lens = step.md.seq_lens_cpu[:num_decodes]
        saw_ragged_decode |= num_decodes == len(plan) and len(set(dec_lens)) > 1
        outs = sim.run(step)
        assert_matches(sim, step, outs, atol, rtol)
        sim.commit(step)
        sim.check_cache()
        if n == 2:  # finish every prompt so that the rest of the steps are decode-only
            plan = [(i, sim.seqs[i].prefill_left) for i in ids if sim.seqs[i].prefill_left]
            if plan:
                step = sim.prepare(plan, 0)
                assert_matches(sim, step, sim.run(step), atol, rtol)
                sim.commit(step)
    assert saw_mixed and saw_ragged_decode
    # The page tables really have gaps and are out of order.
    tables = [s.pages for s in sim.seqs]
    assert any(t != sorted(t) or any(b != a + 1 for a, b in zip(t, t[1:])) for t in tables)
    return sim


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_puts_every_token_at_its_slot(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    num_pages, page_size, h, d = 9, 16, 2, 8
    k_cache = torch.full((num_pages, page_size, h, d), NAN, dtype=dtype)
    v_cache = torch.full_like(k_cache, NAN)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:37]
    k = torch.randn(37, h, d, generator=gen).to(dtype)
    v = torch.randn(37, h, d, generator=gen).to(dtype)
    write_kv(k_cache, v_cache, k, v, slots)
    for cache, new in ((k_cache, k), (v_cache, v)):
        for t, slot in enumerate(slots.tolist()):
            assert torch.equal(cache[slot // page_size, slot % page_size], new[t])
        untouched = torch.ones(num_pages * page_size, dtype=torch.bool)
        untouched[slots] = False
        assert torch.isnan(cache.view(-1, h, d)[untouched].float()).all()


@pytest.mark.parametrize("page_size", [16, 128])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_fp8_cache_matches_reference_over_its_dequantized_history(hq: int, hkv: int, page_size: int) -> None:
    """An FP8 cache: the stored bytes and scales equal `kv_cache.fp8.quantize` of every token's
    K/V (checked after every step), and attention equals the reference over the dequantized history."""
    run_scenario(
        hq=hq, hkv=hkv, head_dim=64, page_size=page_size, dtype=torch.float32,
        atol=1e-5, rtol=1e-5, seed=31 * page_size + hq, fp8=True,
    )


@pytest.mark.parametrize("head_dim", [64, 32])
@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_matches_reference_float32(hq: int, hkv: int, page_size: int, head_dim: int) -> None:
    run_scenario(
        hq=hq, hkv=hkv, head_dim=head_dim, page_size=page_size, dtype=torch.float32,
        atol=1e-5, rtol=1e-5, seed=1000 * page_size + 10 * head_dim + hq,
    )


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_matches_reference_bfloat16(hq: int, hkv: int, page_size: int) -> None:
    run_scenario(
        hq=hq, hkv=hkv, head_dim=64, page_size=page_size, dtype=torch.bfloat16,
        atol=2e-2, rtol=2e-2, seed=7 + page_size + hq,
    )


def test_decode_batch_of_equal_lengths() -> None:
    """All decodes at the same length (no padding mask needed), partial last page."""
    sim = Sim(num_layers=2, hq=8, hkv=2, head_dim=32, page_size=16, num_pages=20, dtype=torch.float32, seed=3)
    ids = [sim.add_seq(37) for _ in range(3)]
    for plan, nd in (([(i, 37) for i in ids], 0), ([(i, 1) for i in ids], 3), ([(i, 1) for i in ids], 3)):
        step = sim.prepare(plan, nd)
        assert_matches(sim, step, sim.run(step), 1e-5, 1e-5)
        sim.commit(step)
    sim.check_cache()


def test_single_token_prefill_chunks_and_decode_only_one() -> None:
    """Prefill chunks of one token (not decodes: they come after them) and a lone decode."""
    sim = Sim(num_layers=1, hq=4, hkv=4, head_dim=32, page_size=16, num_pages=12, dtype=torch.float32, seed=4)
    a, b = sim.add_seq(19), sim.add_seq(33)
    plans = [
        ([(a, 19), (b, 1)], 0),
        ([(a, 1), (b, 1)], 1),
        ([(a, 1), (b, 30)], 1),
        ([(a, 1), (b, 1)], 1),
        ([(b, 1)], 1),
    ]
    for plan, nd in plans:
        step = sim.prepare(plan, nd)
        assert_matches(sim, step, sim.run(step), 1e-5, 1e-5)
        sim.commit(step)
    sim.check_cache()


def _fill_page(sim: Sim, layer: int, page: int, value: torch.Tensor | float) -> None:
    sim.kv.k[layer][page] = value
    sim.kv.v[layer][page] = value


def test_backend_reads_the_cache_and_only_its_own_pages() -> None:
    """Corrupting a page a sequence uses changes its output; any other page changes nothing."""
    page_size = 16
    sim = Sim(num_layers=2, hq=8, hkv=2, head_dim=32, page_size=page_size, num_pages=40, dtype=torch.float32, seed=5)
    dec = [sim.add_seq(n) for n in (45, 71, 23)]
    pre = sim.add_seq(61)
    step = sim.prepare([(i, sim.seqs[i].prompt_len) for i in dec] + [(pre, 20)], 0)
    sim.run(step)
    sim.commit(step)
    # The step under test: three decodes of different lengths, then a chunk with a cached prefix.
    step = sim.prepare([(i, 1) for i in dec] + [(pre, 25)], 3)
    base = sim.run(step)
    assert_matches(sim, step, base, 1e-5, 1e-5)
    rows = {}
    start = 0
    for i, qlen in step.plan:
        rows[i] = slice(start, start + qlen)
        start += qlen

    def check(corrupt_layer: int, page: int, owner: int | None) -> None:
        saved_k = sim.kv.k[corrupt_layer][page].clone()
        saved_v = sim.kv.v[corrupt_layer][page].clone()
        noise = torch.randn(sim.kv.k[corrupt_layer][page].shape, generator=sim.gen) * 3
        _fill_page(sim, corrupt_layer, page, noise)
        outs = sim.run(step)  # rewrites the same new K/V: the step is idempotent
        for layer in range(sim.num_layers):
            for i, rows_i in rows.items():
                same = torch.equal(outs[layer][rows_i], base[layer][rows_i])
                if layer == corrupt_layer and i == owner:
                    assert not same, f"seq {i} ignored a corrupted page {page} of its own"
                else:
                    assert same, f"seq {i} layer {layer} changed when page {page} (layer {corrupt_layer}) did"
        sim.kv.k[corrupt_layer][page] = saved_k
        sim.kv.v[corrupt_layer][page] = saved_v

    for i in [*dec, pre]:
        s = sim.seqs[i]
        for page in s.pages[: (s.length) // page_size]:  # full pages of the cached prefix
            for layer in range(sim.num_layers):
                check(layer, page, i)
    for page in sorted(set(range(sim.kv.num_pages)) - sim.used_pages()):
        check(0, page, None)
    # The corruption must not have leaked into the restored state.
    assert_matches(sim, step, sim.run(step), 1e-5, 1e-5)


def test_padding_reads_no_garbage() -> None:
    """A short decode next to a long one: its padded slots (page 0 and the tail of its last page)
    may hold anything, NaN or Inf included, without changing its output."""
    sim = Sim(num_layers=1, hq=4, hkv=2, head_dim=32, page_size=16, num_pages=12, dtype=torch.float32, seed=6)
    sim.free = [p for p in sim.free if p != 0]  # page 0 stays unwritten: it is the padding page
    short, long_ = sim.add_seq(5), sim.add_seq(51)
    step = sim.prepare([(short, 5), (long_, 51)], 0)
    sim.run(step)
    sim.commit(step)
    step = sim.prepare([(short, 1), (long_, 1)], 2)
    base = sim.run(step)
    assert_matches(sim, step, base, 1e-5, 1e-5)
    for junk in (math.inf, -math.inf, 1e30):
        _fill_page(sim, 0, 0, junk)
        tail = sim.seqs[short].pages[0]
        sim.kv.k[0][tail, 6:] = junk
        sim.kv.v[0][tail, 6:] = junk
        assert torch.equal(sim.run(step)[0], base[0])
