"""Choosing the page score: settings, the pattern file's `selection`, the engine's resolution of
`auto`, and `lserve calibrate --selection` end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lserve.calibration.selection import PREFERENCE, SelectionCalibrationConfig, choose
from lserve.cli import main
from lserve.config import EngineConfig
from lserve.errors import LServeError
from lserve.sparse.patterns import HeadPattern, PatternError, load_pattern, save_pattern, shipped_pattern
from lserve.sparse.selection import DEFAULT_SELECTOR_INTERVAL, pattern_page_size


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(page_score="exact"), "page_score"),
    (dict(token_budget=512, score_channels=6), "score_channels must be a power of two"),
    (dict(token_budget=512, score_channels=1), "score_channels must be a power of two"),
    (dict(selection_top_p=0.9), "needs token_budget"),
    (dict(token_budget=512, selection_top_p=1.5), "selection_top_p must be in"),
    (dict(token_budget=512, selection_top_p=0.0), "selection_top_p must be in"),
    (dict(token_budget=512, selection_min_tokens=0), "selection_min_tokens"),
    (dict(token_budget=512, label_dtype="int8"), "label_dtype='int8' is not one of"),
])
def test_bad_selection_settings_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_kwargs(**kwargs)


def test_pattern_selection_round_trips_and_is_checked(tmp_path: Path) -> None:
    entry = {"page_score": "label_channels", "score_channels": 2, "channels": [[[0, 1], [2, 3]]]}
    path = save_pattern(HeadPattern(torch.ones(1, 2), {"model": "m"}, selection=entry), tmp_path / "p.json")
    assert load_pattern(path).selection == entry
    assert load_pattern(save_pattern(HeadPattern(torch.ones(1, 2)), tmp_path / "q.json")).selection is None
    body = json.loads(path.read_text())
    body["selection"] = [1, 2]
    path.write_text(json.dumps(body))
    with pytest.raises(PatternError, match="selection must be an object"):
        load_pattern(path)


def test_the_shipped_pattern_chooses_rope_mass() -> None:
    path = shipped_pattern("SmolLM2-135M-Instruct")
    assert path is not None
    selection = load_pattern(path).selection
    assert selection is not None and selection["page_score"] == "rope_mass" and selection["score_channels"] == 32
    assert selection["selector_interval"] == 1  # re-selecting every step keeps NIAH answers (docs/accuracy.md)
    assert selection["selection_local_tokens"] == 128  # keeps passkey answers (docs/accuracy.md)
    assert selection["page_size"] == 16  # keeps passkey answers with the streaming heads (docs/accuracy.md)
    assert torch.tensor(selection["channels"]).shape == (30, 3, 8)  # the calibrated label channels
    kept = selection["measured"]["answers_kept"]
    assert kept["alone"][selection["page_score"]] >= kept["alone"]["quest"]


@pytest.mark.parametrize("bad", [24, 8, 256, True, "16"])
def test_pattern_page_size_is_checked(bad: object) -> None:
    assert pattern_page_size(None) is None and pattern_page_size({"page_score": "quest"}) is None
    assert pattern_page_size({"page_score": "rope_mass", "page_size": 32}) == 32
    assert pattern_page_size({"page_score": "exact", "page_size": 32}) is None  # `auto` would not take it
    with pytest.raises(LServeError, match="page_size"):
        pattern_page_size({"page_score": "quest", "page_size": bad}, "p.json")


def test_choice_takes_the_most_answers_then_the_preference() -> None:
    answers = {"alone": {"quest": 3, "midrange": 17, "rope_channels": 20, "label_channels": 18},
               "streaming": {"quest": 3, "midrange": 14, "rope_channels": 10, "label_channels": 11}}
    assert choose(("quest", "midrange", "rope_channels", "label_channels"), answers) == "midrange"  # 31 answers
    tied = {"alone": {"quest": 5, "midrange": 5, "rope_channels": 5, "label_channels": 5}}
    assert choose(("quest", "midrange", "label_channels", "rope_channels"), tied) == "rope_channels"
    assert choose(("quest", "rope_channels", "rope_mass"), {"a": {"quest": 5, "rope_channels": 5, "rope_mass": 5}}) \
        == PREFERENCE[0]
    assert choose(("quest", "label_channels"), tied) == "label_channels"
    with pytest.raises(ValueError, match="candidates"):
        SelectionCalibrationConfig(output="x", candidates=("oracle",))


def test_engine_resolves_auto_from_the_shipped_pattern_and_sizes_the_labels(tmp_path: Path) -> None:
    from lserve import LLM

    auto = LLM(dtype="float32", device="cpu", token_budget=512, num_kv_pages=40)
    core = auto.llm_engine.core
    assert core.page_score.kind == "rope_mass" and "calibrated" in core.page_score.source
    assert core.config.cache.page_size == core.kv_cache.shape.page_size == 16  # the pattern's pages
    paged = core.kv_cache.paged
    assert paged.k_min is None and paged.k_label is not None and paged.k_label[0].shape == (3, 41 * 16, 32)
    assert paged.label_channels[0].tolist() == [list(range(16, 32)) + list(range(48, 64))] * 3
    assert core.runner.backend.selector.score == "rope_mass"
    assert core.page_score.interval == core.runner.backend.selector.interval == 1  # the pattern's
    assert core.page_score.local_tokens == 128 and core.runner.backend.selector.local_pages == 8  # the pattern's
    every3 = LLM(dtype="float32", device="cpu", token_budget=512, num_kv_pages=40, selector_interval=3,
                 selection_local_tokens=0, page_size=64)
    e3core = every3.llm_engine.core
    assert e3core.runner.backend.selector.interval == 3 and e3core.kv_cache.shape.page_size == 64  # the settings win
    assert e3core.runner.backend.selector.local_pages == 0
    # the pattern's local window yields where it does not combine: top-p, or a budget with no page to spare
    for extra in ({"selection_top_p": 0.9}, {"token_budget": 160}):
        other = LLM(dtype="float32", device="cpu", num_kv_pages=40, **{"token_budget": 512, **extra})
        assert other.llm_engine.core.runner.backend.selector.local_pages == 0
    quest = LLM(dtype="float32", device="cpu", token_budget=512, num_kv_pages=40, page_score="quest")
    qcore = quest.llm_engine.core
    assert qcore.kv_cache.paged.k_label is None and qcore.kv_cache.paged.k_min is not None
    assert qcore.runner.backend.selector.interval == DEFAULT_SELECTOR_INTERVAL  # not calibrated for quest
    assert qcore.kv_cache.shape.page_size == 64  # the pattern's pages go with its score only
    assert LLM(dtype="float32", device="cpu", num_kv_pages=40).llm_engine.core.kv_cache.shape.page_size == 64
    # 100 tokens: KV, plus each token's labels of 32 channels, or 4 logical pages' min and max per 64-token page
    kv = 30 * 3 * 64 * 2 * 4
    assert core.kv_bytes_per_sequence(100) == 7 * 16 * (kv + 30 * 3 * 32 * 4)
    assert qcore.kv_bytes_per_sequence(100) == 2 * 64 * kv + 2 * 4 * 30 * 3 * 64 * 2 * 4
    # with streaming heads the paged pool holds each layer's dense heads: their label channels
    label = LLM(dtype="float32", device="cpu", token_budget=512, num_kv_pages=40, page_score="label_channels",
                streaming_sparsity=0.5, max_num_seqs=2)
    lcore = label.llm_engine.core
    chosen = torch.tensor(load_pattern(shipped_pattern("SmolLM2-135M-Instruct")).selection["channels"])
    for layer, heads in enumerate(lcore.kv_cache.dense_heads):
        assert lcore.kv_cache.paged.label_channels[layer].tolist() == chosen[layer, heads].tolist()
    assert any(len(h) < 3 for h in lcore.kv_cache.dense_heads)
    # FP8 labels: one byte per channel and a float32 scale per token and head
    fp8 = LLM(dtype="float32", device="cpu", token_budget=512, num_kv_pages=40, label_dtype="fp8", score_channels=64)
    fcore = fp8.llm_engine.core
    assert fcore.page_score.label_fp8 and fcore.kv_cache.paged.k_label[0].dtype == torch.float8_e4m3fn
    assert fcore.kv_cache.paged.label_scale is not None and fcore.kv_cache.paged.label_scale[0].shape == (3, 41 * 16)
    assert fcore.kv_bytes_per_sequence(100) == 7 * 16 * (kv + 30 * 3 * (64 + 4))
    plain = save_pattern(HeadPattern(torch.ones(30, 3)), tmp_path / "plain.json")  # no selection in it
    with pytest.raises(LServeError, match="calibrate --selection"):
        LLM(dtype="float32", device="cpu", token_budget=512, num_kv_pages=40, page_score="label_channels",
            attn_pattern=str(plain))


def test_cli_selection_step_writes_the_choice(tiny_with_tokenizer: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sel"
    rc = main(["calibrate", "--selection", "--model", str(tiny_with_tokenizer), "--output", str(out), "--device", "cpu",
               "--dtype", "float32", "--token-budget", "320", "--score-channels", "4", "--passkey-lengths", "500",
               "--passkey-samples", "1"])
    assert rc == 0, capsys.readouterr().err
    pattern = load_pattern(out / f"{tiny_with_tokenizer.name}.json")
    sel = pattern.selection
    assert sel is not None and sel["page_score"] in ("quest", "midrange", "rope_channels", "label_channels", "rope_mass")
    assert torch.tensor(sel["channels"]).shape == (2, 2, 4)
    measured = sel["measured"]
    # no head pattern for this model: its all-dense base has no streaming heads to measure with
    assert set(measured["answers_kept"]) == {"alone"} and measured["samples"] == 4
    by_interval = measured["answers_kept_by_interval"]
    assert sel["selector_interval"] in (4, 1) and set(by_interval["alone"]) == {"every 4", "every 1"}
    assert by_interval["alone"]["every 4"] == measured["answers_kept"]["alone"][sel["page_score"]]
    by_local = measured["answers_kept_by_local_tokens"]
    assert set(by_local["alone"]) == {"local 0", "local 128"} and sel["selection_local_tokens"] in (0, 128)
    assert by_local["alone"]["local 0"] == by_interval["alone"][f"every {sel['selector_interval']}"]
    by_page = measured["answers_kept_by_page_size"]
    assert set(by_page["alone"]) == {"pages of 64", "pages of 16"} and sel["page_size"] in (64, 16)
    assert by_page["alone"]["pages of 64"] == by_local["alone"][f"local {sel['selection_local_tokens']}"]
    by_count = measured["answers_kept_by_channels"]
    assert by_count["alone"]["4 channels"] == by_page["alone"][f"pages of {sel['page_size']}"]
    rope = sel["page_score"] in ("rope_channels", "rope_mass")  # only RoPE channels are measured at other counts
    measured_labels = {"4 channels", "8 channels", "8 FP8 channels", "16 FP8 channels"}  # head dimension 16
    assert set(by_count["alone"]) == (measured_labels if rope else {"4 channels"})
    assert (sel["score_channels"], sel["label_dtype"]) in (
        ((4, "auto"), (8, "auto"), (8, "fp8"), (16, "fp8")) if rope else ((4, "auto"),))
    assert set(measured["recall"]) == {"quest", "midrange", "rope_channels", "label_channels", "rope_mass", "oracle"}
    assert measured["calibration_tokens"] == 1024  # clamped to the model's window
    assert pattern.scores.shape == (2, 2) and bool((pattern.scores == 1).all())  # no pattern: all dense
    assert not pattern.calibrated_for_streaming
    printed = capsys.readouterr().out
    assert "page_score=" in printed and "oracle" in printed and "re-selected every 1 steps" in printed
    assert "selection_local_tokens=" in printed and "local 128 tokens: answers" in printed
    assert f"page_size={sel['page_size']}" in printed and "pages of 16: answers" in printed
    assert f"score_channels={sel['score_channels']}" in printed and "4 channels: answers" in printed
    assert f"label_dtype={sel['label_dtype']}" in printed
    # the engine takes the choice from the file (`auto`)
    from lserve import LLM

    llm = LLM(model=str(tiny_with_tokenizer), dtype="float32", device="cpu", token_budget=128,
              attn_pattern=str(out / f"{tiny_with_tokenizer.name}.json"), num_kv_pages=16)
    assert llm.llm_engine.core.page_score.kind == sel["page_score"]
    assert llm.llm_engine.core.kv_cache.shape.page_size == sel["page_size"]


def test_cli_selection_bad_input_is_one_line(tiny_with_tokenizer: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["calibrate", "--selection", "--model", str(tiny_with_tokenizer), "--output", str(tmp_path / "o"),
               "--device", "cpu", "--passkey-lengths", "5000"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "limit" in err, err
    rc = main(["calibrate", "--selection", "--model", str(tiny_with_tokenizer), "--output", str(tmp_path / "o"),
               "--device", "cpu", "--token-budget", "256"])  # no room for the default 128-token local window
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "local_tokens" in err, err
    rc = main(["calibrate", "--selection", "--model", str(tiny_with_tokenizer), "--output", str(tmp_path / "o"),
               "--device", "cpu", "--selection-page-sizes", "64,24"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "page_size must be a power of two" in err, err
    for counts, message in (("4,6", "powers of two"), ("4,128", "head dimension")):
        rc = main(["calibrate", "--selection", "--model", str(tiny_with_tokenizer), "--output", str(tmp_path / "o"),
                   "--device", "cpu", "--passkey-lengths", "500", "--selection-channel-counts", counts])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and message in err, err


def test_a_selection_only_pattern_is_refused_for_streaming_heads(tiny_with_tokenizer: Path, tmp_path: Path) -> None:
    """A pattern whose heads were not calibrated (`lserve calibrate --selection` on a model without
    one) carries a page-score choice only: it serves page selection, and streaming heads from it are
    a clear error rather than an arbitrary half of its equal scores."""
    from lserve import LLM
    from lserve.sparse.patterns import STREAMING_NOT_CALIBRATED

    path = save_pattern(HeadPattern(torch.ones(2, 2), {"streaming_heads": STREAMING_NOT_CALIBRATED},
                                    selection={"page_score": "midrange", "selector_interval": 2}),
                        tmp_path / "selection-only.json")
    llm = LLM(model=str(tiny_with_tokenizer), dtype="float32", device="cpu", token_budget=128, num_kv_pages=16,
              attn_pattern=str(path))
    assert llm.llm_engine.core.page_score.kind == "midrange" and llm.llm_engine.core.page_score.interval == 2
    with pytest.raises(LServeError, match="selection-only.json has no streaming-head calibration"):
        LLM(model=str(tiny_with_tokenizer), dtype="float32", device="cpu", streaming_sparsity=0.5,
            attn_pattern=str(path))


def test_calibration_takes_the_labels_that_keep_most_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from lserve.calibration import selection as cs

    cfg = cs.SelectionCalibrationConfig(output="x")
    assert cs.channel_counts(cfg, "rope_mass", 64) == (16, 32)  # its r and twice that
    assert cs.channel_counts(cfg, "rope_mass", 16) == (16,)  # no more channels than the head has
    assert cs.channel_counts(cfg, "quest", 64) == (8,) and cs.channel_counts(cfg, "label_channels", 64) == (8,)
    assert cs.channel_counts(cs.SelectionCalibrationConfig(output="x", channel_counts=(8, 4, 32)), "rope_channels",
                             64) == (8, 4, 32)
    # FP8 labels at twice each count (about the same bytes), within the head dimension
    assert cs.label_formats(cfg, "rope_mass", 64) == ((16, "auto"), (32, "auto"), (32, "fp8"), (64, "fp8"))
    assert cs.label_formats(cfg, "rope_mass", 32) == ((16, "auto"), (32, "auto"), (32, "fp8"))
    assert cs.label_formats(cs.SelectionCalibrationConfig(output="x", fp8_labels=False), "rope_mass", 64) \
        == ((16, "auto"), (32, "auto"))
    assert cs.label_formats(cfg, "quest", 64) == ((8, "auto"),)
    by_page = {"alone": {"pages of 16": 6}, "streaming": {"pages of 16": 5}}
    kept = {"32 channels": (8, 7), "32 FP8 channels": (8, 7), "64 FP8 channels": (8, 7)}

    def fake(cfg, tok, pattern, path, runs):  # noqa: ANN001, ANN202
        assert [(r["score_channels"], r["label_dtype"]) for r in runs.values()] == [(32, "auto"), (32, "fp8"),
                                                                                   (64, "fp8")]
        assert all(r["page_size"] == 16 and r["selection_local_tokens"] == 128 for r in runs.values())
        return {s: {name: kept[name][k] for name in runs} for k, s in enumerate(("alone", "streaming"))}

    monkeypatch.setattr(cs, "measure_answers", fake)
    formats = cs.label_formats(cfg, "rope_mass", 64)
    best, by_count = cs.choose_labels(cfg, "rope_mass", formats, 1, 128, 16, by_page, None, None, None)
    assert best == (32, "fp8")  # a tie of three: 36 bytes a token and head, against 64 and 68
    assert by_count["alone"] == {"16 channels": 6, "32 channels": 8, "32 FP8 channels": 8, "64 FP8 channels": 8}
    kept["64 FP8 channels"] = (9, 7)
    assert cs.choose_labels(cfg, "rope_mass", formats, 1, 128, 16, by_page, None, None, None)[0] == (64, "fp8")
    kept.update({name: (6, 5) for name in kept})  # a tie with the first: 16 channels cost least
    assert cs.choose_labels(cfg, "rope_mass", formats, 1, 128, 16, by_page, None, None, None)[0] == (16, "auto")
    with pytest.raises(ValueError, match="channel_counts"):
        cs.SelectionCalibrationConfig(output="x", channel_counts=(16, 16))
