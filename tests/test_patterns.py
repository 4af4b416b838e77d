"""Head patterns: DuoAttention TSV and lserve JSON loading, binarising, clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lserve.sparse.patterns import (
    DUO_FILE,
    HeadPattern,
    PatternError,
    binarize,
    load_pattern,
    save_pattern,
    shipped_pattern,
)


def _write_tsv(path: Path, rows: list[list[float]]) -> Path:
    path.write_text("\n".join("\t".join(str(x) for x in r) for r in rows) + "\n")
    return path


def test_duoattention_tsv_file_and_folder(tmp_path: Path) -> None:
    rows = [[0.98, -0.01, 0.5], [1.02, 0.2, 0.0]]  # raw gates stray outside [0, 1]
    tsv = _write_tsv(tmp_path / DUO_FILE, rows)
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 128, "recent_size": 256, "lr": 0.02}))
    for p in (tsv, tmp_path):
        pat = load_pattern(p)
        assert pat.shape == (2, 3)
        assert torch.equal(pat.scores, torch.tensor([[0.98, 0.0, 0.5], [1.0, 0.2, 0.0]]))
        assert pat.metadata["sink_size"] == 128 and pat.metadata["recent_size"] == 256


def test_binarize_global_quantile_and_ties() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.5, 0.95, 0.05, 0.7]])
    flags = binarize(scores, 0.5)
    assert int(flags.sum()) == 4
    # the four lowest over the whole model: 0.05, 0.1, then the first two of the three 0.5s in order
    assert flags.tolist() == [[False, True, True, True], [False, False, True, False]]
    assert not binarize(scores, 0.0).any() and binarize(scores, 1.0).all()
    assert torch.equal(binarize(scores, 0.5), flags)  # deterministic
    with pytest.raises(ValueError, match="sparsity"):
        binarize(scores, 1.5)


def test_lserve_json_round_trip(tmp_path: Path) -> None:
    pat = HeadPattern(torch.rand(4, 2), {"model": "tiny", "sink": 64, "local": 512, "method": "test"})
    path = save_pattern(pat, tmp_path / "tiny.json")
    back = load_pattern(path)
    assert torch.allclose(back.scores, pat.scores, atol=1e-6)
    assert back.metadata == pat.metadata
    assert torch.allclose(load_pattern(tmp_path / DUO_FILE).scores, pat.scores, atol=1e-6)


def test_shape_check_names_both_shapes() -> None:
    pat = HeadPattern(torch.rand(32, 8), source="p.tsv")
    pat.check_model(32, 8)
    with pytest.raises(PatternError, match="32 layers x 8 KV heads, the model has 30 x 3"):
        pat.check_model(30, 3)


@pytest.mark.parametrize("content,needle", [
    ("0.1\tabc\n", "not a row of numbers"),
    ("0.1\t0.2\n0.3\n", "different lengths"),
    ("nan\t0.2\n", "finite"),
    ("\n\n", "non-empty"),
])
def test_bad_tsv_files(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "p.tsv").write_text(content)
    with pytest.raises(PatternError, match=needle):
        load_pattern(tmp_path / "p.tsv")


def test_bad_json_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"scores": [[0.1]]}')
    with pytest.raises(PatternError, match="not an lserve head pattern"):
        load_pattern(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{broken")
    with pytest.raises(PatternError, match="cannot read"):
        load_pattern(tmp_path / "b.json")
    with pytest.raises(PatternError, match="does not exist"):
        load_pattern(tmp_path / "absent.tsv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PatternError, match="no full_attention_heads.tsv"):
        load_pattern(empty)


def test_no_shipped_pattern_for_unknown_model() -> None:
    assert shipped_pattern("no-such-model") is None


def test_streaming_fraction_is_computed_once() -> None:
    """Engine statistics read it every step; with the flags on a GPU each recount would be a sync."""
    from lserve.attention.sparsity import HeadSparsity

    flags = (torch.tensor([True, False]), torch.tensor([False, False]))
    sparsity = HeadSparsity(flags, 1, 2, 3, 4)
    assert sparsity.streaming_fraction == 0.25
    flags[1][0] = True  # flags are fixed for an engine's life: no recount
    assert sparsity.streaming_fraction == 0.25
