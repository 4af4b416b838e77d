"""`lserve eval` data: lengths in the model's tokens, needle depths, determinism, exact scoring, parsing.

These tests use the default model's tokenizer only (no weights are loaded).
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from lserve.eval.niah import make_niah_samples
from lserve.eval.options import (
    ConfigSpec,
    parse_compare,
    parse_compare_list,
    parse_depths,
    parse_size_list,
)
from lserve.eval.passkey import make_passkey_samples
from lserve.eval.ruler import SUBTASKS, make_ruler_samples, parse_subtasks, zipf_counts
from lserve.eval.sample import Haystack, LengthError, Needle, PromptFormat, fit_count
from lserve.eval.scoring import contains_word, first_number, score
from lserve.eval.system import load_tokenizer_for


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_for({})


@pytest.fixture(scope="module")
def fmt(tokenizer):
    return PromptFormat(tokenizer, chat=True)


def _check_length(sample, tokenizer) -> None:
    # the ids are what the engine gets; re-encoding the prompt text must give the same count
    assert sample.num_tokens <= sample.length
    assert sample.num_tokens >= 0.98 * sample.length, (sample.sample_id, sample.num_tokens)
    add_special = not sample.chat
    assert len(tokenizer.encode(sample.prompt_text, add_special_tokens=add_special)) == sample.num_tokens


@pytest.mark.parametrize("length", [512, 1000, 3000])
def test_passkey_and_niah_hit_the_length(fmt, tokenizer, length: int) -> None:
    for s in make_passkey_samples(fmt, [length], 2) + make_niah_samples(fmt, [length], [0.0, 1.0]):
        _check_length(s, tokenizer)


def test_plain_prompts_hit_the_length(tokenizer) -> None:
    plain = PromptFormat(tokenizer, chat=False)
    samples = make_passkey_samples(plain, [700, 2048], 1)
    for s in samples:
        _check_length(s, tokenizer)
        assert s.prompt_text.endswith("The pass key is") and "<|im_start|>" not in s.prompt_text


@pytest.mark.parametrize("length", [1024, 2500])
def test_ruler_subtasks_hit_the_length(fmt, tokenizer, length: int) -> None:
    samples = make_ruler_samples(fmt, [length], list(SUBTASKS), 1)
    assert [s.subtask for s in samples] == list(SUBTASKS)
    for s in samples:
        _check_length(s, tokenizer)


def _measured_depth(fmt: PromptFormat, sample, needle: str, intro_end: str, question_start: str) -> float:
    text = sample.user_text
    start = text.index(intro_end) + len(intro_end)
    end = text.index(question_start)
    at = text.index(needle)
    before = fmt.count(text[start:at])
    total = fmt.count(text[start:end]) - fmt.count(needle)
    return before / total


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needles_land_at_the_requested_depth(fmt, depth: float) -> None:
    passkey = make_passkey_samples(fmt, [2048], 1, [depth])[0]
    needle = f"The pass key is {passkey.answers[0]}."
    got = _measured_depth(fmt, passkey, needle, "quiz you about it.\n\n", "\n\nWhat is the pass key?")
    assert abs(got - depth) <= 0.02, (depth, got)
    niah = make_niah_samples(fmt, [2048], [depth])[0]
    needle = f"is {niah.answers[0]}."
    got = _measured_depth(fmt, niah, needle, "<document>\n", "\n</document>")
    assert abs(got - depth) <= 0.03, (depth, got)


def test_depth_grid_and_counts(fmt) -> None:
    samples = make_niah_samples(fmt, [512, 768], [0.0, 0.5, 1.0], num_samples=2)
    assert len(samples) == 2 * 3 * 2
    assert {(s.length, s.depth) for s in samples} == {(n, d) for n in (512, 768) for d in (0.0, 0.5, 1.0)}
    assert len({s.answers[0] for s in samples}) == len(samples)  # a fresh code per sample


def test_generation_is_deterministic(fmt) -> None:
    a = make_ruler_samples(fmt, [600], ["niah_multikey", "vt", "cwe", "fwe"], 1, seed=3)
    b = make_ruler_samples(fmt, [600], ["niah_multikey", "vt", "cwe", "fwe"], 1, seed=3)
    c = make_ruler_samples(fmt, [600], ["niah_multikey", "vt", "cwe", "fwe"], 1, seed=4)
    assert [(s.prompt_ids, s.answers) for s in a] == [(s.prompt_ids, s.answers) for s in b]
    assert all(x.prompt_ids != y.prompt_ids for x, y in zip(a, c))
    p1, p2 = make_passkey_samples(fmt, [512], 3, seed=1), make_passkey_samples(fmt, [512], 3, seed=1)
    assert [s.prompt_ids for s in p1] == [s.prompt_ids for s in p2]


def test_ruler_answers_are_in_the_prompt_and_well_posed(fmt) -> None:
    samples = {s.subtask: s for s in make_ruler_samples(fmt, [1500], list(SUBTASKS), 1)}
    for name in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        s = samples[name]
        for value in s.answers:
            assert s.user_text.count(f" is {value}.") == 1, name
    vt = samples["vt"]
    names = vt.answers
    assert f"VAR {names[0]} = " in vt.user_text
    for a, b in itertools.pairwise(names):  # the chain appears in order
        assert vt.user_text.index(f"VAR {a} =") < vt.user_text.index(f"VAR {b} = VAR {a}.")
    cwe = samples["cwe"]
    words = Counter(line.split(". ", 1)[1] for line in cwe.user_text.splitlines() if ". " in line and line[0].isdigit())
    top = [w for w, _ in words.most_common(10)]
    assert sorted(top) == sorted(cwe.answers)
    assert min(words[w] for w in cwe.answers) > max(c for w, c in words.items() if w not in cwe.answers)
    fwe = samples["fwe"]
    body = fwe.user_text.split("\n\n")[1].split()
    counts = Counter(body).most_common()
    assert [w for w, _ in counts[:3]] == fwe.answers and counts[2][1] > counts[3][1]


def test_zipf_counts_keep_the_top_three_apart() -> None:
    for total in (30, 100, 1000, 12345):
        counts = zipf_counts(total, 60)
        assert counts[0] > counts[1] > counts[2] > max(counts[3:])
        assert sum(counts) >= total


def test_haystack_boundaries_are_sentence_starts() -> None:
    hay = Haystack(iter(["One two three.", "Four five.", "Six seven eight nine."] * 10))
    assert hay.boundary(9, 0.0) == 0 and hay.boundary(9, 1.0) == 9
    assert hay.boundary(9, 0.4) == 3  # 3.6 words: the start of "Four five." is closest
    text = hay.text(5, [Needle(0.5, "NEEDLE.")])
    assert text == "One two three. NEEDLE. Four five."


def test_fit_count_finds_the_largest_fitting_count() -> None:
    for target in (5, 37, 1000, 99_999):
        n = fit_count(lambda k: 3 * k + 5, target)
        assert 3 * n + 5 <= target < 3 * (n + 1) + 5
    with pytest.raises(LengthError, match="too short"):
        fit_count(lambda k: 10 + k, 5)


def test_too_short_length_is_a_clear_error(fmt) -> None:
    with pytest.raises(LengthError, match="too short for the passkey prompt"):
        make_passkey_samples(fmt, [40], 1)


# ---- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("output, expected", [
    ("48213", 1.0), ("The pass key is 48213.", 1.0), ("48,213", 1.0), ("  48213 is the pass key", 1.0),
    ("4821", 0.0), ("482131", 0.0), ("48213 ", 1.0), ("48 213", 0.0), ("The pass key is 48212.", 0.0),
    ("12345 or 48213", 0.0), ("", 0.0), ("no number here", 0.0), ("-48213", 1.0), ("48213.5", 0.0), ("48213.", 1.0),
])
def test_first_number_scoring_is_exact(output: str, expected: float) -> None:
    assert score("first_number", output, ["48213"]) == expected


def test_all_words_scoring_rejects_near_misses() -> None:
    refs = ["1234567", "apple", "QWHTZ"]
    assert score("all_words", "1234567, Apple and qwhtz", refs) == 1.0
    assert score("all_words", "12345678 apples QWHTZA", refs) == 0.0
    assert score("all_words", "x1234567 pineapple _QWHTZ", refs) == 0.0
    assert score("all_words", "1234567 then apple", refs) == pytest.approx(2 / 3)
    assert contains_word("value: 1234567.", "1234567") and not contains_word("value: 1234567890", "1234567")
    assert first_number("no digits") is None and first_number("a 1,234,567 b") == "1234567"
    with pytest.raises(ValueError, match="unknown scorer"):
        score("fuzzy", "x", ["x"])


# ---- option parsing ---------------------------------------------------------------------------


def test_sizes_and_depths() -> None:
    assert parse_size_list("1k,2K,1.5k,4096,1k") == [1024, 2048, 1536, 4096]
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0] and parse_depths("0,50,100") == [0.0, 0.5, 1.0]
    for bad in ("1x", "0", "-1k", "0.3k"):
        with pytest.raises(ValueError, match="length"):
            parse_size_list(bad)
    with pytest.raises(ValueError, match="outside"):
        parse_depths("0,-0.5")


def test_compare_values_take_the_field_types() -> None:
    spec = parse_compare("stream50:streaming_sparsity=0.5,decode-sink-tokens=64,decode_local_tokens=1k,"
                         "attn_pattern=/x/p.tsv,num_kv_pages=none,attention_backend=torch")
    assert spec == ConfigSpec("stream50", {
        "streaming_sparsity": 0.5, "decode_sink_tokens": 64, "decode_local_tokens": 1024,
        "attn_pattern": "/x/p.tsv", "num_kv_pages": None, "attention_backend": "torch",
    })
    assert parse_compare("dense:") == ConfigSpec("dense") == parse_compare("dense")
    assert [s.name for s in parse_compare_list(None)] == ["default"]


@pytest.mark.parametrize("text, message", [
    ("x:token_budgett=3", "unknown engine setting 'token_budgett'"),
    ("x:page_size=big", "page_size='big' is not an integer"),
    ("x:streaming_sparsity=half", "is not a number"),
    ("x:attention_backend=cuda", "is not one of"),
    ("x:model=/tmp/m", "model cannot differ"),
    ("x:page_size", "is not field=value"),
    (":page_size=32", "bad --compare"),
])
def test_compare_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_compare(text)


def test_duplicate_compare_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        parse_compare_list(["a:", "a:page_size=32"])


def test_subtask_names() -> None:
    assert parse_subtasks(None) == list(SUBTASKS)
    assert parse_subtasks("vt,cwe,vt") == ["vt", "cwe"]
    with pytest.raises(ValueError, match="unknown ruler subtask 'nope'"):
        parse_subtasks("vt,nope")


def test_niah_with_a_user_haystack_file(fmt, tokenizer, tmp_path) -> None:
    text = "Octopuses have three hearts.  Honey never spoils!\nBananas are berries? Yes, they are.\n"
    path = tmp_path / "facts.txt"
    path.write_text(text)
    samples = make_niah_samples(fmt, [600], [0.5], haystack_file=path)
    s = samples[0]
    _check_length(s, tokenizer)
    assert "Octopuses have three hearts. Honey never spoils! Bananas are berries?" in s.user_text
    assert s.user_text.count(f"is {s.answers[0]}.") == 1 and "Maria" not in s.user_text  # no generated prose
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        make_niah_samples(fmt, [600], [0.5], haystack_file=empty)
