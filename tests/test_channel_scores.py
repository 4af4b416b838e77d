"""The page scores beside Quest's bound: midrange, and channel scores over per-token key labels
(kernels and the torch backend's versions against `ops.reference`; the KV append's labels)."""

from __future__ import annotations

import random

import pytest
import torch

from lserve.attention.torch_backend import channel_page_scores_torch, page_scores_torch, write_labels
from lserve.errors import LServeError
from lserve.kv_cache.fp8 import FP8_DTYPE, quantize
from lserve.ops import reference as ref
from lserve.ops.kv_append import kv_append
from lserve.ops.page_scores import channel_page_scores, page_scores
from lserve.sparse.selection import DEFAULT_SELECTOR_INTERVAL, resolve_page_score, rope_slow_channels
from tests.helpers_paging import shuffled_tables

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _labels(num_pages: int, page_size: int, hkv: int, d: int, r: int, gen: torch.Generator,
            tables: list[list[int]], seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random labels (stale ones past each sequence made huge: they must not count) and channels."""
    labels = torch.randn((hkv, num_pages * page_size, r), generator=gen)
    for n, t in zip(seq_lens, tables):
        for pos in range(n, len(t) * page_size):
            labels[:, t[pos // page_size] * page_size + pos % page_size] = 1e4
    channels = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)]).to(torch.int32)
    return labels, channels


@pytest.mark.parametrize("page_size", [16, 32, 128])
@pytest.mark.parametrize("hq,hkv", [(3, 3), (8, 2), (8, 1)])
@pytest.mark.parametrize("aggregate", ["sum", "max", "mass"])
@pytest.mark.parametrize("r", [2, 8, 32])
def test_channel_scores_match_the_reference(page_size: int, hq: int, hkv: int, aggregate: str, r: int) -> None:
    """`aggregate="mass"` stands for the rope_mass score (log-sum-exp over heads and tokens)."""
    d = 32
    seed = page_size * 7 + hq + r
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seq_lens = [rng.randint(1, 5 * page_size) for _ in range(3)] + [3 * page_size + 1]
    tables, num_pages, table = shuffled_tables(seq_lens, page_size, rng)
    labels, channels = _labels(num_pages, page_size, hkv, d, r, gen, tables, seq_lens)
    q = torch.randn((len(seq_lens), hq, d), generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    mass = aggregate == "mass"
    agg = "sum" if mass else aggregate
    if mass:  # labels past each sequence must not count: huge ones would dominate the sum of exps
        labels = labels.clamp(max=50.0)
    want = ref.channel_page_scores_ref(q, labels, channels, tables, seq_lens, page_size, agg, mass=mass)
    got = channel_page_scores(q.to(DEVICE), labels.to(DEVICE), channels.to(DEVICE), table.to(DEVICE),
                              lens.to(DEVICE), page_size, agg, block_tokens=64, mass=mass)
    torch_got = channel_page_scores_torch(q, labels, channels, table, lens, page_size, agg, mass=mass)
    finite = torch.isfinite(want)
    for out in (got.cpu(), torch_got):
        assert torch.equal(torch.isfinite(out), finite)
        torch.testing.assert_close(out[finite].double(), want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mass", [False, True])
def test_channel_scores_through_a_head_map_equal_the_gathered_heads(mass: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    group, d, page, r = 2, 32, 16, 4
    seq_lens = [5 * page + 3, 2 * page]
    labels = torch.randn((2, 8 * page, r), generator=gen)
    channels = torch.tensor([[1, 5, 9, 30], [0, 2, 4, 6]], dtype=torch.int32)
    qkv = torch.randn((2, 3 * group + 5, d), generator=gen)
    q = qkv[:, : 3 * group]  # three model KV heads; the pool holds heads 2 and 0
    table = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 0, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    picked = torch.cat([q[:, 2 * group : 3 * group], q[:, :group]], dim=1)
    args = (labels.to(DEVICE), channels.to(DEVICE), table.to(DEVICE), lens.to(DEVICE), page, "sum")
    got = channel_page_scores(q.to(DEVICE), *args, kv_head_map=torch.tensor([2, 0], device=DEVICE), group=group,
                              mass=mass)
    assert torch.equal(got, channel_page_scores(picked.contiguous().to(DEVICE), *args, mass=mass))
    assert torch.isinf(got[1, :, 2:]).all() and torch.isfinite(got[0]).all()


@pytest.mark.parametrize("page_size,logical", [(16, 8), (64, 16), (128, 32)])
@pytest.mark.parametrize("hq,hkv", [(3, 1), (8, 2)])
def test_midrange_scores_match_the_reference(page_size: int, logical: int, hq: int, hkv: int) -> None:
    d = 32
    gen = torch.Generator().manual_seed(page_size + hq)
    rng = random.Random(page_size)
    seq_lens = [rng.randint(1, 4 * page_size) for _ in range(3)]
    tables, num_pages, table = shuffled_tables(seq_lens, page_size, rng)
    rows = num_pages * page_size // logical
    k_min = torch.randn((rows, hkv, d), generator=gen)
    k_max = k_min + torch.rand((rows, hkv, d), generator=gen)
    q = torch.randn((len(seq_lens), hq, d), generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    want = ref.page_scores_ref(q, k_min, k_max, tables, seq_lens, page_size, logical, "sum", midrange=True)
    got = page_scores(q.to(DEVICE), k_min.to(DEVICE), k_max.to(DEVICE), table.to(DEVICE), lens.to(DEVICE),
                      page_size, logical, "sum", midrange=True).cpu()
    torch_got = page_scores_torch(q, k_min, k_max, table, lens, page_size, logical, "sum", midrange=True)
    quest = ref.page_scores_ref(q, k_min, k_max, tables, seq_lens, page_size, logical, "sum")
    finite = torch.isfinite(want)
    for out in (got, torch_got):
        torch.testing.assert_close(out[finite].double(), want[finite], rtol=1e-4, atol=1e-4)
    assert (quest[finite] > want[finite]).all()  # the bound's slack is positive on random boxes


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_kv_append_writes_key_labels(mapped: bool, fp8: bool) -> None:
    """Labels of prefill runs and decode rows, through a head map or not, in the model's dtype or
    FP8 with per-token scales, equal the reference's (bit for bit)."""
    gen = torch.Generator().manual_seed(11)
    page_size, d, r = 16, 32, 4
    hkv_model = 3
    head_map = torch.tensor([2, 0]) if mapped else None
    pool_heads = 2 if mapped else hkv_model
    channels = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(pool_heads)]).to(torch.int32)
    k_cache = torch.zeros((5, page_size, pool_heads, d))
    labels = torch.full((pool_heads, 5 * page_size, r), float("nan"))
    scale = torch.full((pool_heads, 5 * page_size), float("nan")) if fp8 else None
    if fp8:
        labels = torch.zeros((pool_heads, 5 * page_size, r), dtype=FP8_DTYPE)
    want_k, want_labels = k_cache.clone(), labels.clone()
    want_scale = scale.clone() if scale is not None else None
    dk, dv, dl = k_cache.to(DEVICE), k_cache.clone().to(DEVICE), labels.to(DEVICE)
    ds = scale.to(DEVICE) if scale is not None else None
    for slots in ([17, 18, 19, 20, 21, 3, 4, 70], [22], [5, 71, 40]):
        s = torch.tensor(slots)
        k = torch.randn((len(slots), hkv_model, d), generator=gen) * 3.0
        pool_k = k[:, head_map] if head_map is not None else k
        ref.kv_append_ref(pool_k, pool_k, s, want_k, want_k.clone(), k_label=want_labels, label_channels=channels,
                          label_scale=want_scale)
        kv_append(k.to(DEVICE), k.to(DEVICE), s.to(DEVICE), dk, dv, k_label=dl, label_channels=channels.to(DEVICE),
                  head_map=head_map.to(DEVICE) if head_map is not None else None, label_scale=ds)
    assert torch.equal(dk.cpu(), want_k)
    assert torch.equal(dl.cpu().float().nan_to_num(-1), want_labels.float().nan_to_num(-1))
    if ds is not None and want_scale is not None:
        assert torch.equal(ds.cpu().nan_to_num(-1), want_scale.nan_to_num(-1))
        written = want_scale[0].isfinite()
        dequantized = want_labels[0, written].float() * want_scale[0, written, None]
        exact = want_k.view(-1, pool_heads, d)[written.nonzero()[:, 0], 0][:, channels[0].long()]
        assert not torch.equal(dequantized, exact)  # E4M3 rounds...
        torch.testing.assert_close(dequantized, exact, rtol=2**-4, atol=0)  # ...to within half its 3-bit step
    # the torch backend's writer, over the same tokens in one go
    torch_labels = torch.full_like(labels, float("nan")) if not fp8 else torch.zeros_like(labels)
    torch_scale = torch.full_like(scale, float("nan")) if scale is not None else None
    written = torch.tensor([17, 18, 19, 20, 21, 3, 4, 70, 22, 5, 71, 40])
    keys = want_k.view(-1, pool_heads, d)[written]
    write_labels(torch_labels, channels, keys, written, torch_scale)
    assert torch.equal(torch_labels.float().nan_to_num(-1), want_labels.float().nan_to_num(-1))
    if torch_scale is not None and want_scale is not None:
        assert torch.equal(torch_scale.nan_to_num(-1), want_scale.nan_to_num(-1))


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),  # the CPU interpreter's bf16 matmul is wrong
    torch.float16, torch.float32,
])
@pytest.mark.parametrize("page_size,hq,hkv,r", [(16, 9, 3, 16), (64, 8, 2, 64), (32, 8, 1, 8)])
@pytest.mark.parametrize("aggregate", ["sum", "max", "mass"])
def test_fp8_labels_match_the_reference(dtype: torch.dtype, page_size: int, hq: int, hkv: int, r: int,
                                        aggregate: str) -> None:
    """FP8 labels (E4M3 with a power-of-two scale per token and head) score as the reference's
    dequantized labels, in the kernel and the torch backend; the scales are read (scores with
    the scales dropped differ) and the scores are within FP8 rounding of the exact labels'."""
    gen = torch.Generator().manual_seed(page_size + r + hq)
    rng = random.Random(page_size + hq)
    seq_lens = [rng.randint(1, 9 * page_size) for _ in range(2)] + [7 * page_size + 3]
    tables, num_pages, table = shuffled_tables(seq_lens, page_size, rng)
    exact, channels = _labels(num_pages, page_size, hkv, 64, r, gen, tables, seq_lens)
    exact = exact.clamp(max=50.0) * torch.rand((hkv, exact.shape[1], 1), generator=gen) * 8  # scales vary by token
    labels, scale = quantize(exact)
    q = torch.randn((len(seq_lens), hq, 64), generator=gen).to(dtype)
    mass = aggregate == "mass"
    agg = "sum" if mass else aggregate
    want = ref.channel_page_scores_ref(q, labels, channels, tables, seq_lens, page_size, agg, mass=mass,
                                       label_scale=scale)
    args = (channels.to(DEVICE), table.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            page_size, agg)
    got = channel_page_scores(q.to(DEVICE), labels.to(DEVICE), *args, mass=mass, block_tokens=4 * page_size,
                              label_scale=scale.to(DEVICE)).cpu()
    torch_got = channel_page_scores_torch(q, labels, channels, table, torch.tensor(seq_lens, dtype=torch.int32),
                                          page_size, agg, mass=mass, label_scale=scale)
    finite = torch.isfinite(want)
    for out in (got, torch_got):
        assert torch.equal(torch.isfinite(out), finite)
        torch.testing.assert_close(out[finite].double(), want[finite], rtol=1e-4, atol=1e-3)
    unscaled = ref.channel_page_scores_ref(q, labels, channels, tables, seq_lens, page_size, agg, mass=mass)
    assert not torch.allclose(unscaled[finite], want[finite], rtol=0.1)
    unquantized = ref.channel_page_scores_ref(q, exact, channels, tables, seq_lens, page_size, agg, mass=mass)
    torch.testing.assert_close(want[finite], unquantized[finite], rtol=0.1, atol=2.0)


def test_channel_scores_reject_fp8_labels_without_scales() -> None:
    labels = torch.zeros((1, 16, 2), dtype=FP8_DTYPE, device=DEVICE)
    args = (torch.zeros((1, 2), dtype=torch.int32, device=DEVICE), torch.zeros((1, 1), dtype=torch.int32,
            device=DEVICE), torch.ones(1, dtype=torch.int32, device=DEVICE), 16)
    q = torch.zeros((1, 1, 16), device=DEVICE)
    with pytest.raises(ValueError, match="FP8 labels need label_scale"):
        channel_page_scores(q, labels, *args)
    with pytest.raises(ValueError, match="do not fit labels"):
        channel_page_scores(q, labels, *args, label_scale=torch.zeros((1, 15), device=DEVICE))


def test_kv_append_rejects_labels_with_statistics() -> None:
    k = torch.zeros((1, 1, 16), device=DEVICE)
    cache = torch.zeros((1, 16, 1, 16), device=DEVICE)
    stats = torch.zeros((1, 1, 16), device=DEVICE)
    with pytest.raises(ValueError, match="not both"):
        kv_append(k, k, torch.zeros(1, dtype=torch.long, device=DEVICE), cache, cache.clone(), stats, stats.clone(),
                  k_label=torch.zeros((1, 16, 2), device=DEVICE),
                  label_channels=torch.zeros((1, 2), dtype=torch.int32, device=DEVICE))


def test_rope_channels_are_the_slowest_rotation_pairs() -> None:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))  # head dim 64
    assert rope_slow_channels(inv_freq, 8) == [28, 29, 30, 31, 60, 61, 62, 63]
    scaled = inv_freq.clone()
    scaled[3] = 1e-9  # a rope scaling that slows frequency 3 the most
    assert rope_slow_channels(scaled, 2) == [3, 35]
    with pytest.raises(LServeError, match="even"):
        rope_slow_channels(inv_freq, 3)


def test_page_score_resolution() -> None:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))  # head dim 16
    spec = resolve_page_score("auto", 4, None, inv_freq, 2, 3)
    assert spec.kind == "rope_channels" and spec.channels.shape == (2, 3, 4)
    assert spec.channels[1, 2].tolist() == [6, 7, 14, 15]
    assert resolve_page_score("auto", None, None, inv_freq, 2, 3).num_channels == 8  # the score's default
    assert resolve_page_score("rope_mass", None, None, inv_freq, 2, 3).num_channels == 16
    assert resolve_page_score("auto", None, {"page_score": "rope_mass", "score_channels": 4}, inv_freq, 2,
                              3).num_channels == 4  # the pattern's r
    chosen = {"page_score": "label_channels", "score_channels": 2, "channels": [[[0, 1]] * 3, [[2, 3]] * 3]}
    spec = resolve_page_score("auto", 8, chosen, inv_freq, 2, 3, "p.json")
    assert spec.kind == "label_channels" and spec.channels[1, 0].tolist() == [2, 3] and "p.json" in spec.source
    assert resolve_page_score("quest", 8, chosen, inv_freq, 2, 3).channels is None
    assert resolve_page_score("auto", 8, {"page_score": "midrange"}, inv_freq, 2, 3).kind == "midrange"
    with pytest.raises(LServeError, match="calibrate"):
        resolve_page_score("label_channels", 8, None, inv_freq, 2, 3)
    with pytest.raises(LServeError, match="shape"):
        resolve_page_score("label_channels", 8, {"channels": [[[0, 1]]]}, inv_freq, 2, 3)
    with pytest.raises(LServeError, match=r"\[0, 16\)"):
        resolve_page_score("label_channels", 8, {"channels": [[[0, 99]] * 3] * 2}, inv_freq, 2, 3)
    # the labels' dtype: the setting, else the pattern's with auto, else the model's
    fp8_choice = {"page_score": "rope_mass", "label_dtype": "fp8"}
    assert resolve_page_score("auto", None, fp8_choice, inv_freq, 2, 3).label_fp8
    assert not resolve_page_score("auto", None, fp8_choice, inv_freq, 2, 3, label_dtype="auto").label_fp8
    assert not resolve_page_score("rope_mass", None, fp8_choice, inv_freq, 2, 3).label_fp8  # not auto's choice
    assert resolve_page_score("rope_channels", None, None, inv_freq, 2, 3, label_dtype="fp8").label_fp8
    with pytest.raises(LServeError, match="p.json: the selection's label_dtype"):
        resolve_page_score("auto", None, {"page_score": "rope_mass", "label_dtype": "fp4"}, inv_freq, 2, 3, "p.json")


def test_reselection_interval_resolution() -> None:
    """The pattern's calibrated interval goes with its calibrated score; a setting overrides it."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    chosen = {"page_score": "rope_mass", "selector_interval": 1}
    assert resolve_page_score("auto", None, chosen, inv_freq, 2, 3).interval == 1
    assert resolve_page_score("auto", None, chosen, inv_freq, 2, 3, interval=3).interval == 3
    assert resolve_page_score("rope_mass", None, chosen, inv_freq, 2, 3).interval == DEFAULT_SELECTOR_INTERVAL
    assert resolve_page_score("auto", None, None, inv_freq, 2, 3).interval == DEFAULT_SELECTOR_INTERVAL
    assert resolve_page_score("auto", None, {"page_score": "quest", "selector_interval": 2}, inv_freq, 2,
                              3).interval == 2
    for bad in (0, "2", 1.5, True):
        with pytest.raises(LServeError, match="selector_interval must be an integer >= 1"):
            resolve_page_score("auto", None, {"page_score": "rope_mass", "selector_interval": bad}, inv_freq, 2, 3,
                               "p.json")


def test_calibration_takes_the_interval_that_keeps_most_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from lserve.calibration import selection as cs

    cfg = cs.SelectionCalibrationConfig(output="x", intervals=(4, 2, 1))
    first = {"alone": {"dense": 9, "rope_mass": 6}, "streaming": {"dense": 9, "rope_mass": 5}}
    kept = {2: (8, 7), 1: (8, 7)}  # 2 and 1 tie above 4: the longer interval is cheaper

    def fake(cfg, tok, pattern, path, runs):  # noqa: ANN001, ANN202
        assert {r["selector_interval"] for r in runs.values()} == {2, 1}
        assert all(r["page_score"] == "rope_mass" for r in runs.values())
        return {s: {f"every {i}": kept[i][k] for i in (2, 1)} for k, s in enumerate(("alone", "streaming"))}

    monkeypatch.setattr(cs, "measure_answers", fake)
    best, by_interval = cs.choose_interval(cfg, "rope_mass", first, None, None, None)
    assert best == 2 and by_interval["alone"] == {"every 4": 6, "every 2": 8, "every 1": 8}
    kept[1] = (9, 7)
    assert cs.choose_interval(cfg, "rope_mass", first, None, None, None)[0] == 1
    kept.update({2: (6, 5), 1: (6, 5)})  # no gain: keep the engine's default
    assert cs.choose_interval(cfg, "rope_mass", first, None, None, None)[0] == 4
    with pytest.raises(ValueError, match="intervals"):
        cs.SelectionCalibrationConfig(output="x", intervals=(0,))


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),  # the CPU interpreter's bf16 matmul is wrong
    torch.float16,
])
@pytest.mark.parametrize("page_size,hq,hkv,r", [(16, 9, 3, 16), (64, 8, 2, 16), (32, 8, 1, 8)])
def test_rope_mass_in_half_precision_equals_the_reference(dtype: torch.dtype, page_size: int, hq: int, hkv: int,
                                                          r: int) -> None:
    """The engine's labels and queries are bf16/fp16: rope_mass's matmul of them (channels and
    heads padded to 16) keeps the float64 reference's scores, over blocks of several pages."""
    gen = torch.Generator().manual_seed(page_size + r)
    rng = random.Random(page_size)
    seq_lens = [rng.randint(1, 9 * page_size) for _ in range(2)] + [7 * page_size + 3]
    tables, num_pages, table = shuffled_tables(seq_lens, page_size, rng)
    labels, channels = _labels(num_pages, page_size, hkv, 64, r, gen, tables, seq_lens)
    labels, q = labels.clamp(max=50.0).to(dtype), torch.randn((len(seq_lens), hq, 64), generator=gen).to(dtype)
    want = ref.channel_page_scores_ref(q, labels, channels, tables, seq_lens, page_size, mass=True)
    got = channel_page_scores(q.to(DEVICE), labels.to(DEVICE), channels.to(DEVICE), table.to(DEVICE),
                              torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), page_size, mass=True,
                              block_tokens=4 * page_size).cpu()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-4)
