"""Presence and frequency penalties, logit bias, allowed tokens, min_tokens and
include_stop_str_in_output: greedy outputs checked step by step against transformers' logits
processed by the OpenAI definitions, and every control's effect on the default model."""

from __future__ import annotations

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.errors import RequestRejected

PROMPT = "Write a list of fruits: apples, pears,"


def _greedy_reference(hf_model, prompt_ids: list[int], steps: int, presence: float, frequency: float,
                      bias: dict[int, float]) -> list[int]:
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(steps):
        with torch.inference_mode():
            logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            for t, b in bias.items():
                logits[t] += b
            out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_penalties_and_bias_follow_openais_definition(default_llm: LLM, hf_model) -> None:
    bias = {11: 3.0, 28: -5.0}  # lift one token, push down the comma
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, presence_penalty=0.7,
                            frequency_penalty=1.5, logit_bias=bias)
    out = default_llm.generate(PROMPT, params, use_tqdm=False)[0]
    want = _greedy_reference(hf_model, out.prompt_token_ids, 10, 0.7, 1.5, bias)
    assert out.outputs[0].token_ids == want
    plain = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                 use_tqdm=False)[0]
    assert plain.outputs[0].token_ids != want  # the controls changed the output


def test_allowed_tokens_and_a_banned_first_choice(default_llm: LLM) -> None:
    plain = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    first = plain.outputs[0].token_ids[0]
    banned = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logit_bias={first: -100}),
                                  use_tqdm=False)[0]
    assert banned.outputs[0].token_ids[0] != first
    allowed = [260, 28, 30, 11]
    for temperature in (0.0, 1.0):
        out = default_llm.generate(PROMPT, SamplingParams(temperature=temperature, seed=5, max_tokens=8,
                                                          allowed_token_ids=allowed), use_tqdm=False)[0]
        assert set(out.outputs[0].token_ids) <= set(allowed)


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(default_llm: LLM) -> None:
    prompt = "The capital of France is"
    short = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[30]),
                                 use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] == 30 and len(short.token_ids) < 6
    held = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[30],
                                                       min_tokens=6), use_tqdm=False)[0].outputs[0]
    # the stop token (masked like EOS) cannot end the output before 6 tokens
    assert len(held.token_ids) >= 6 and 30 not in held.token_ids[:5]
    stop = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, stop=[","]),
                                use_tqdm=False)[0].outputs[0]
    later = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, stop=[","], min_tokens=8),
                                 use_tqdm=False)[0].outputs[0]
    assert len(later.token_ids) >= 8 and len(later.text) > len(stop.text)


def test_include_stop_str_in_output(default_llm: LLM) -> None:
    kw = dict(temperature=0, max_tokens=16, stop=[","])
    cut = default_llm.generate(PROMPT, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]
    kept = default_llm.generate(PROMPT, SamplingParams(include_stop_str_in_output=True, **kw),
                                use_tqdm=False)[0].outputs[0]
    assert kept.text == cut.text + "," and kept.stop_reason == cut.stop_reason == ","


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(logit_bias={1: 150.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
])
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_token_ids_outside_the_vocabulary_are_rejected(default_llm: LLM) -> None:
    for kwargs in (dict(logit_bias={10**7: 1.0}), dict(allowed_token_ids=[1, 10**7])):
        with pytest.raises(RequestRejected, match="out of the vocabulary"):
            default_llm.generate("hi", SamplingParams(**kwargs), use_tqdm=False)
