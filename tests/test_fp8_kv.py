"""The FP8 KV cache format (`kv_cache.fp8`) and the Triton kernels that write and read it.

The format's own properties (power-of-two scales, E4M3 rounding, error bounds); the Triton
rounding against torch's conversion on every E4M3 value and every tie; the KV-append kernel
against its reference, byte for byte, with key statistics, labels, head maps and single-token
rows (statistics and labels from the unquantized keys); the decode and prefill kernels over FP8
caches against the reference over the dequantized caches, and within FP8's error of the
unquantized ones. Engine-level runs are in tests/test_fp8_engine.py; both pools and page
selection in tests/test_ring_and_selection.py.
"""

from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

from lserve.kv_cache.fp8 import (
    FP8_DTYPE,
    as_bytes,
    dequantize,
    dequantize_pages,
    pow2_scale,
    quantize,
    quantize_pages,
)
from lserve.ops import reference as ref
from lserve.ops.fp8 import dequantize_listed_pages, quantize_rows, round_e4m3
from lserve.ops.kv_append import kv_append, plan_segments
from lserve.ops.sparse_decode import sparse_decode
from lserve.ops.sparse_prefill import plan_tiles, sparse_prefill
from tests.test_ops import DEVICE, TMA, PagedSeqs, _rel_err

# ---- the format ------------------------------------------------------------------------------


def test_scales_are_powers_of_two_that_put_the_row_maximum_in_the_top_binade() -> None:
    gen = torch.Generator().manual_seed(0)
    magnitudes = 10.0 ** torch.linspace(-30, 30, 97)
    x = torch.randn((97, 64), generator=gen) * magnitudes[:, None]
    values, scale = quantize(x)
    mantissa = scale.view(torch.int32) & 0x7FFFFF
    assert (mantissa == 0).all() and (scale > 0).all()
    top = x.abs().amax(1) / scale
    assert ((top > 224) & (top <= 448)).all()
    assert values.dtype == FP8_DTYPE and values.float().abs().amax(1).le(448).all()
    # exactly at a boundary: amax = 448 * 2**k -> scale 2**k; a hair above -> the next power of two
    assert pow2_scale(torch.tensor([448.0, 1.75, 0.875 * 2**-100])).tolist() == [1.0, 2.0**-8, 2.0**-109]
    assert pow2_scale(torch.tensor([448.00003])).item() == 2.0


def test_quantize_error_is_half_an_e4m3_unit_and_zero_rows_stay_zero() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((300, 128), generator=gen) * torch.rand((300, 1), generator=gen) * 50
    x[7] = 0.0
    back = dequantize(*quantize(x), torch.float32)
    assert torch.equal(back[7], torch.zeros(128))
    _, scale = quantize(x)
    normal = (x / scale[:, None]).abs() >= 2**-6  # E4M3's normal range: 3 mantissa bits
    rel = ((back - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert rel.max() <= 2**-4 + 1e-7
    # subnormals: an absolute step of 2**-9 (before scaling)
    sub = ~normal
    assert ((back - x).abs()[sub] <= (2**-10 * scale[:, None].expand_as(x))[sub] + 1e-30).all()


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m, other=0.0)
    tl.store(out_ptr + i, round_e4m3(x).to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=m)


def test_triton_rounding_equals_torch_on_every_value_and_every_tie() -> None:
    """Every finite E4M3 value, the midpoints between neighbours (ties to even) and one float32
    step either side of them, and random values of every magnitude: the bytes Triton stores equal
    torch's conversion."""
    codes = torch.arange(256, dtype=torch.uint8)
    exact = codes.view(FP8_DTYPE).float()
    exact = exact[torch.isfinite(exact)].unique()  # ascending, -448 .. 448 (one zero)
    mids = (exact[1:] + exact[:-1]) / 2
    step = torch.nextafter(mids, torch.full_like(mids, float("inf"))) - mids
    gen = torch.Generator().manual_seed(2)
    rand = (torch.rand(4000, generator=gen) * 2 - 1) * 448 * 2.0 ** -torch.randint(0, 20, (4000,), generator=gen)
    x = torch.cat([exact, mids, mids + step, mids - step, rand, torch.tensor([-0.0])]).clamp(-448, 448)
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 256),)](x.to(DEVICE), out, x.numel(), BLOCK=256)
    got, want = out.cpu().view(torch.uint8), x.to(FP8_DTYPE).view(torch.uint8)
    bad = (got != want).nonzero()[:, 0]
    assert not bad.numel(), [(x[i].item(), got[i].item(), want[i].item()) for i in bad[:8]]


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, scale_ptr, D: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, D)
    q, s = quantize_rows(tl.load(x_ptr + row * D + d), 0)
    tl.store(out_ptr + row * D + d, q)
    tl.store(scale_ptr + row, s)


def test_triton_quantize_rows_equals_the_reference_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((40, 64), generator=gen) * (10.0 ** torch.linspace(-12, 12, 40))[:, None]
    x[5] = 0.0
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=DEVICE)
    scale = torch.empty(40, device=DEVICE)
    _quantize_kernel[(40,)](x.to(DEVICE), out, scale, D=64)
    values, scales = quantize(x)
    assert torch.equal(out.cpu().view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(scale.cpu(), scales)


# ---- KV append -------------------------------------------------------------------------------


def _fp8_cache(num_pages: int, page_size: int, hkv: int, d: int) -> tuple[torch.Tensor, ...]:
    """K, V (NaN bytes) and their scales (NaN): what no step wrote stays poisoned."""
    k = torch.full((num_pages, page_size, hkv, d), 0x7F, dtype=torch.uint8, device=DEVICE).view(FP8_DTYPE)
    scales = torch.full((num_pages, hkv, page_size), float("nan"), device=DEVICE)
    return k, k.clone(), scales, scales.clone()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(as_bytes(a).view(torch.uint8) if a.dtype == FP8_DTYPE else a.view(torch.int32),
                       as_bytes(b).view(torch.uint8) if b.dtype == FP8_DTYPE else b.view(torch.int32))


@pytest.mark.parametrize("page_size", [16, 32, 64, 128])
@pytest.mark.parametrize("mode", ["plain", "statistics", "labels"])
def test_kv_append_fp8_equals_the_reference_and_keeps_unquantized_statistics(page_size: int, mode: str) -> None:
    """Chunks that cross pages, single-token decode rows and a head map (a pool holding some of
    the model's heads): bytes and scales equal the reference's; statistics and labels equal those
    an unquantized cache keeps for the same keys."""
    hkv, model_heads, d, logical = 2, 3, 32, 16
    heads = torch.tensor([2, 0], device=DEVICE)  # cache head -> model KV head
    gen = torch.Generator().manual_seed(page_size)
    num_pages = 7
    kc, vc, ks, vs = _fp8_cache(num_pages, page_size, hkv, d)
    ref_kc, ref_vc, ref_ks, ref_vs = (t.clone() for t in (kc, vc, ks, vs))
    plain_kc = torch.full((num_pages, page_size, hkv, d), float("nan"), device=DEVICE)
    plain_vc = plain_kc.clone()
    rows = num_pages * page_size // logical
    stats = mode == "statistics"
    k_min = torch.full((rows, hkv, d), 5.0, device=DEVICE) if stats else None
    k_max = torch.full((rows, hkv, d), -5.0, device=DEVICE) if stats else None
    plain_min = k_min.clone() if k_min is not None else None
    plain_max = k_max.clone() if k_max is not None else None
    labels = chans = plain_labels = None
    if mode == "labels":
        chans = torch.tensor([[3, 17, 30, 1], [0, 8, 9, 31]], dtype=torch.int32, device=DEVICE)
        labels = torch.zeros((hkv, num_pages * page_size, 4), device=DEVICE)
        plain_labels = labels.clone()
    pages = [5, 1, 3, 0, 6, 2]
    written = 0
    for n in (page_size + 7, 1, 1, 2 * page_size - 3, 5):
        pos = torch.arange(written, written + n)
        slots = (torch.tensor(pages)[pos // page_size] * page_size + pos % page_size).to(DEVICE)
        k = (torch.randn((n, model_heads, d), generator=gen) * 3).to(DEVICE)
        v = torch.randn((n, model_heads, d), generator=gen).to(DEVICE)
        segs = plan_segments(slots, logical, all_single=n == 1) if stats else None
        extra = dict(k_label=labels, label_channels=chans) if labels is not None else {}
        kv_append(k, v, slots, kc, vc, k_min, k_max, segs, logical_page_size=logical, head_map=heads,
                  k_scale=ks, v_scale=vs, **extra)
        plain_extra = dict(k_label=plain_labels, label_channels=chans) if plain_labels is not None else {}
        kv_append(k, v, slots, plain_kc, plain_vc, plain_min, plain_max, segs, logical_page_size=logical,
                  head_map=heads, **plain_extra)
        ref.kv_append_ref(k[:, heads], v[:, heads], slots, ref_kc, ref_vc, k_scale=ref_ks, v_scale=ref_vs)
        written += n
    for got, want in ((kc, ref_kc), (vc, ref_vc), (ks, ref_ks), (vs, ref_vs)):
        assert _same_bits(got, want)
    if stats:
        assert torch.equal(k_min, plain_min) and torch.equal(k_max, plain_max)
        assert (k_min != 5.0).any()
    if labels is not None:
        assert torch.equal(labels, plain_labels) and (labels != 0).any()
    # the dequantized cache is within half an E4M3 unit of the unquantized one
    back = dequantize_pages(kc, ks, torch.float32)
    written_slots = ~plain_kc.isnan()
    rel = ((back - plain_kc).abs() / plain_kc.abs().clamp_min(1e-6))[written_slots & (plain_kc.abs() > 0.05)]
    assert rel.max() <= 2**-4 + 1e-6 and not back[written_slots].isnan().any()


def test_kv_append_refuses_mismatched_scales() -> None:
    kc, vc, ks, vs = _fp8_cache(2, 16, 2, 32)
    k = torch.randn((3, 2, 32), device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="FP8"):
        kv_append(k, k, slots, kc, vc)  # an FP8 cache without scales
    with pytest.raises(ValueError, match="FP8"):
        plain = torch.zeros((2, 16, 2, 32), device=DEVICE)
        kv_append(k, k, slots, plain, plain.clone(), k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="scales"):
        kv_append(k, k, slots, kc, vc, k_scale=ks[:, :, :8], v_scale=vs[:, :, :8])


# ---- attention over FP8 pages ----------------------------------------------------------------


def _quantized(seqs: PagedSeqs) -> tuple[torch.Tensor, ...]:
    """The sequences' caches in FP8 (per token and head), and their dequantized float32 copies."""
    kq, ks = quantize_pages(seqs.k_cache)
    vq, vs = quantize_pages(seqs.v_cache)
    return kq, vq, ks, vs, dequantize_pages(kq, ks, torch.float32), dequantize_pages(vq, vs, torch.float32)


@pytest.mark.parametrize("page_size", [16, 64, 128])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_over_fp8_pages(page_size: int, num_splits: int) -> None:
    """Dense, streaming windows that cross pages, and page lists: equal to the reference over the
    dequantized cache; within FP8's error of the unquantized one; scales really applied."""
    hq, hkv, d = 8, 2, 64
    rng = random.Random(page_size + num_splits)
    seq_lens = [rng.randint(2, 5 * page_size) | 1 for _ in range(3)] + [2 * page_size]
    seqs = PagedSeqs(seq_lens, page_size, hkv, d, torch.float32, seed=page_size)
    kq, vq, ks, vs, k_deq, v_deq = _quantized(seqs)
    q = torch.randn((len(seq_lens), hq, d), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    scale = d**-0.5
    streaming = torch.tensor([True, False], device=DEVICE)
    sink, local = page_size // 2 + 1, page_size + 7
    lists = {(b, h): sorted({(n - 1) // page_size} | {p for p in range((n - 1) // page_size) if rng.random() < 0.5})
             for b, n in enumerate(seq_lens) for h in range(hkv)}
    width = max(len(t) for t in seqs.page_tables)
    page_list = torch.zeros((len(seq_lens), hkv, width), dtype=torch.int32)
    page_len = torch.zeros((len(seq_lens), hkv), dtype=torch.int32)
    for (b, h), chosen in lists.items():
        page_list[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
        page_len[b, h] = len(chosen)
    cases = [dict(), dict(streaming_heads=streaming, sink=sink, local=local),
             dict(page_list=page_list.to(DEVICE), page_list_len=page_len.to(DEVICE))]
    for kw in cases:
        out = sparse_decode(q, kq, vq, seqs.table, seqs.lens, scale, num_splits=num_splits, k_scale=ks,
                            v_scale=vs, **kw)
        args = (kw.get("streaming_heads"), sink, local, lists if "page_list" in kw else None)
        on_stored = ref.sparse_decode_ref(q, k_deq, v_deq, seq_lens, seqs.page_tables, scale, *args)
        on_exact = ref.sparse_decode_ref(q, seqs.k_cache, seqs.v_cache, seq_lens, seqs.page_tables, scale, *args)
        assert _rel_err(out, on_stored) < 2e-3, kw.keys()
        assert 1e-3 < _rel_err(out, on_exact) < 6e-2, kw.keys()
        wrong = sparse_decode(q, kq, vq, seqs.table, seqs.lens, scale, num_splits=num_splits,
                              k_scale=torch.ones_like(ks), v_scale=vs, **kw)
        assert _rel_err(wrong, on_stored) > 0.1  # the K scales are applied


def _staged(kq: torch.Tensor, vq: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, seqs: PagedSeqs):
    """Every page of every sequence dequantized into a copy (page 0 left zero), as the Triton
    backend stages the pages a prefill reads, and the copy's page table."""
    pairs, table = [], torch.zeros_like(seqs.table)
    for row, pages in enumerate(seqs.page_tables):
        for j in range(len(pages)):
            pairs.append((row, j, len(pairs) + 1))
            table[row, j] = len(pairs)
    out_k = torch.zeros((len(pairs) + 1, *kq.shape[1:]), device=DEVICE)
    out_v = torch.zeros_like(out_k)
    dequantize_listed_pages(kq, vq, ks, vs, seqs.table, torch.tensor(pairs, dtype=torch.int32, device=DEVICE),
                            out_k, out_v)
    return out_k, out_v, table


@pytest.mark.parametrize("use_tma", TMA, ids=lambda t: "tma" if t else "ptr")
@pytest.mark.parametrize("page_size", [16, 32, 128])
def test_prefill_over_fp8_pages(page_size: int, use_tma: bool) -> None:
    """The prefill kernel over the staged copy of FP8 pages: equal to the reference over the
    dequantized cache, within FP8's error of the unquantized one, dense and streaming."""
    hq, hkv, d = 4, 2, 32
    rng = random.Random(page_size)
    seq_lens = [rng.randint(page_size + 3, 4 * page_size) | 1 for _ in range(3)]
    q_lens = [seq_lens[0], rng.randint(1, 40), 1]  # a whole prompt, a chunk after a prefix, one token
    seqs = PagedSeqs(seq_lens, page_size, hkv, d, torch.float32, seed=page_size + 1)
    kq, vq, ks, vs, k_deq, v_deq = _quantized(seqs)
    k_copy, v_copy, table = _staged(kq, vq, ks, vs, seqs)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn((starts[-1], hq, d), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    tiles = plan_tiles(q_lens, 16, DEVICE)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    streaming = torch.tensor([False, True], device=DEVICE)
    sink, local = page_size // 2 + 3, page_size + 5
    for heads in (None, streaming):
        out = torch.full_like(q, float("nan"))
        sparse_prefill(q, k_copy, v_copy, table, seqs.lens, qsl, tiles, d**-0.5, streaming_heads=heads, sink=sink,
                       local=local, out=out, use_tma=use_tma)
        on_stored = ref.sparse_prefill_ref(q, k_deq, v_deq, starts, seq_lens, seqs.page_tables, d**-0.5, heads,
                                           sink, local)
        on_exact = ref.sparse_prefill_ref(q, seqs.k_cache, seqs.v_cache, starts, seq_lens, seqs.page_tables,
                                          d**-0.5, heads, sink, local)
        assert _rel_err(out, on_stored) < 2e-3
        assert 1e-3 < _rel_err(out, on_exact) < 6e-2


def test_dequantize_listed_pages_copies_exactly_the_listed_pages() -> None:
    """The FP8 prefill's staging copy: listed (row, logical page) pairs of a page table land
    dequantized on their destination pages, equal to the reference; other pages are untouched."""
    seqs = PagedSeqs([70, 33], 16, 2, 32, torch.float32, seed=3)
    kq, vq, ks, vs, k_deq, v_deq = _quantized(seqs)
    pairs = torch.tensor([[0, 4, 1], [1, 0, 2], [0, 0, 3], [1, 2, 4]], dtype=torch.int32, device=DEVICE)
    out_k = torch.full((6, 16, 2, 32), 7.0, device=DEVICE)
    out_v = out_k.clone()
    dequantize_listed_pages(kq, vq, ks, vs, seqs.table, pairs, out_k, out_v)
    for row, logical, dst in pairs.tolist():
        src = seqs.page_tables[row][logical]
        for got, want in ((out_k[dst], k_deq[src]), (out_v[dst], v_deq[src])):
            written = want.isfinite()  # (a page's unwritten tail is poisoned with NaN)
            assert written.any() and torch.equal(got[written], want[written])
            assert not got[~written].isfinite().any()
    assert (out_k[[0, 5]] == 7.0).all() and (out_v[[0, 5]] == 7.0).all()
