"""SamplingParams validation: every invalid value raises ValueError naming the field."""

from __future__ import annotations

import pytest

from lserve.sampling_params import SamplingParams


def test_defaults_are_valid():
    p = SamplingParams()
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == 0
    assert p.min_p == 0.0
    assert p.max_tokens == 16
    assert p.stop is None and p.stop_strings == ()
    assert p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.seed is None
    assert p.repetition_penalty == 1.0
    assert not p.is_greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0),
        dict(temperature=0),
        dict(temperature=2.5),
        dict(top_p=1.0),
        dict(top_p=1e-6),
        dict(top_k=-1),
        dict(top_k=0),
        dict(top_k=50),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(max_tokens=1),
        dict(max_tokens=None),
        dict(seed=0),
        dict(seed=1234),
        dict(repetition_penalty=1e-3),
        dict(repetition_penalty=2),
        dict(stop_token_ids=[0, 2]),
        dict(ignore_eos=True),
    ],
)
def test_valid_values(kwargs):
    SamplingParams(**kwargs)


def test_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1),
        ("temperature", -0.01),
        ("temperature", "hot"),
        ("temperature", True),
        ("temperature", float("nan")),
        ("top_p", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_k", True),
        ("min_p", 2),
        ("min_p", -0.5),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.0),
        ("seed", -1),
        ("seed", 1.5),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("ignore_eos", 1),
    ],
)
def test_invalid_value_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("stop", ["", [""], [1], ["ok", ""], ["ok", None]])
def test_invalid_stop(stop):
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("ids", [[-1], [1, "2"], [1.0], [True]])
def test_invalid_stop_token_ids(ids):
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=ids)


def test_stop_str_becomes_tuple():
    p = SamplingParams(stop="###")
    assert p.stop_strings == ("###",)
    assert isinstance(p.stop_strings, tuple)


def test_stop_list_becomes_tuple():
    p = SamplingParams(stop=["a", "bc"])
    assert p.stop_strings == ("a", "bc")
    assert SamplingParams(stop=[]).stop_strings == ()


def test_stop_token_ids_none_becomes_list():
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
