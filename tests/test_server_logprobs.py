"""Log-probabilities through the server with the official openai client: the same values as the
offline engine (itself checked against transformers in test_logprobs), in OpenAI's formats,
streaming and not; sampled tokens' log-probabilities and top 5 equal to log_softmax of
transformers' logits on the prompt and the sampled tokens; and a log-likelihood multiple-choice
harness scored through /v1/completions with echo that picks the same answers as scoring offline."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from lserve import LLM, SamplingParams
from tests.server_helpers import API_KEY, MODEL_NAME, RemoteServer
from tests.test_logprobs import _reference

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def client(lserve_server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=lserve_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_completion_logprobs_with_echo_equal_the_engines(client: openai.OpenAI, default_llm: LLM) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                  echo=True)
    lp = r.choices[0].logprobs
    offline = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                          prompt_logprobs=3), use_tqdm=False)[0]
    comp = offline.outputs[0]
    n = len(offline.prompt_token_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [e[t].logprob for t, e in zip(offline.prompt_token_ids[1:], offline.prompt_logprobs[1:])]
    want += [e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert "".join(lp.tokens[n:]) == comp.text and r.choices[0].text == PROMPT + comp.text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[n] == len(PROMPT)
    for j, top in enumerate(lp.top_logprobs[1:], start=1):
        assert 3 <= len(top) <= 4 and lp.tokens[j] in top  # the chosen token and the 3 most likely
        assert max(top.values()) >= lp.token_logprobs[j]


def test_completion_logprobs_stream_add_up_to_the_whole(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                            logprobs=2, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-6)
    assert len(streamed) == 6


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": "Name a fruit."}]
    kw = dict(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    if stream:
        content = [x for c in client.chat.completions.create(stream=True, **kw)
                   if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    else:
        r = client.chat.completions.create(**kw)
        content = r.choices[0].logprobs.content
        assert r.usage.completion_tokens == len(content)
    assert len(content) == 5
    for tok in content:
        assert len(tok.top_logprobs) == 2 and tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob
        assert tok.logprob <= 0 and bytes(tok.bytes).decode("utf-8", errors="replace") == tok.token
        assert tok.top_logprobs[0].token == tok.token  # greedy: the chosen token is the most likely


SAMPLED_TOLERANCE = 2e-4
"""Absolute tolerance between a served log-probability and log_softmax of transformers' logits:
both are float32 on the CPU, and the offline check (test_logprobs) holds the engine to the same."""


def _sampled_reference(default_llm: LLM, hf_model, prompt: str | list[dict[str, str]], seed: int,
                       max_tokens: int) -> tuple[list[int], torch.Tensor, int]:
    """(the tokens a request with this seed samples, log_softmax of transformers' logits at each
    of their positions, the prompt's length): the same seeded draw offline, then the reference
    run on prompt + sampled tokens."""
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True)
    out = (default_llm.chat(prompt, params, use_tqdm=False) if isinstance(prompt, list)
           else default_llm.generate(prompt, params, use_tqdm=False))[0]
    ids = out.outputs[0].token_ids
    n = len(out.prompt_token_ids)
    ref = _reference(hf_model, out.prompt_token_ids + ids)
    return ids, ref[n - 1:n - 1 + len(ids)], n


def test_sampled_logprobs_equal_log_softmax_of_the_logits(client: openai.OpenAI, default_llm: LLM, hf_model) -> None:
    """temperature 1.0 with a seed, logprobs with the top 5, completions and chat: each sampled
    token's log-probability and the 5 most likely values are log_softmax of the model's logits
    (the raw distribution) at that position, within SAMPLED_TOLERANCE."""
    tok = default_llm.get_tokenizer()
    k, seed, max_tokens = 5, 11, 12
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=max_tokens, temperature=1.0, seed=seed,
                                  logprobs=k, extra_body={"ignore_eos": True})
    ids, ref, n = _sampled_reference(default_llm, hf_model, PROMPT, seed, max_tokens)
    lp = r.choices[0].logprobs
    assert r.usage.prompt_tokens == n and lp.tokens == [tok.decode([t]) for t in ids]  # the same draw
    assert r.choices[0].text == tok.decode(ids)
    for j, token in enumerate(ids):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j, token]), abs=SAMPLED_TOLERANCE)
        top = torch.topk(ref[j], k)
        assert sorted(lp.top_logprobs[j].values(), reverse=True)[:k] == pytest.approx(top.values.tolist(),
                                                                                      abs=SAMPLED_TOLERANCE)
        assert lp.tokens[j] in lp.top_logprobs[j]
    assert any(int((row > row[t]).sum()) > 0 for row, t in zip(ref, ids))  # some draws were not the argmax

    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    c = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=1.0,
                                       seed=seed, logprobs=True, top_logprobs=k, extra_body={"ignore_eos": True})
    ids, ref, n = _sampled_reference(default_llm, hf_model, messages, seed, max_tokens)
    content = c.choices[0].logprobs.content
    assert c.usage.prompt_tokens == n and [e.token for e in content] == [tok.decode([t]) for t in ids]
    for j, (entry, token) in enumerate(zip(content, ids)):
        assert entry.logprob == pytest.approx(float(ref[j, token]), abs=SAMPLED_TOLERANCE)
        top = torch.topk(ref[j], k)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=SAMPLED_TOLERANCE)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
    assert any(int((row > row[t]).sum()) > 0 for row, t in zip(ref, ids))


def test_prompt_logprobs_field_by_token_id(lserve_server: RemoteServer) -> None:
    r = httpx.post(lserve_server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, json={
        "prompt": [1, 504, 3575, 282], "max_tokens": 1, "prompt_logprobs": 1}, timeout=60)
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == 4
    for token, entry in zip([504, 3575, 282], plp[1:]):
        assert str(token) in entry and entry[str(token)]["rank"] >= 1
        assert sum(1 for v in entry.values() if v["rank"] == 1) == 1


# a log-likelihood multiple-choice harness, as evaluation harnesses score through the completions API
QUESTIONS = [
    ("The capital of France is", [" Paris", " Berlin", " Tokyo"]),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit", " Kelvin"]),
    ("The largest planet in the solar system is", [" Jupiter", " Mars", " Mercury"]),
    ("Two plus two equals", [" four", " five", " seven"]),
    ("The opposite of hot is", [" cold", " warm", " red"]),
    ("A week has seven", [" days", " months", " trees"]),
    ("The sun rises in the", [" east", " west", " north"]),
    ("Bees make", [" honey", " milk", " glass"]),
    ("The color of grass is", [" green", " blue", " purple"]),
    ("Cats like to chase", [" mice", " planes", " clouds"]),
    ("The first month of the year is", [" January", " July", " October"]),
    ("Ice is frozen", [" water", " sand", " iron"]),
    ("People read books in a", [" library", " volcano", " ocean"]),
    ("The Earth orbits the", [" Sun", " Moon", " Mars"]),
    ("A triangle has three", [" sides", " wheels", " legs"]),
    ("Birds can", [" fly", " swim underwater for days", " read"]),
    ("The chemical symbol for gold is", [" Au", " Ag", " Fe"]),
    ("Shakespeare wrote", [" Hamlet", " The Odyssey", " Don Quixote"]),
    ("Paris is a city in", [" France", " Spain", " Canada"]),
    ("The number after nine is", [" ten", " eight", " three"]),
]


def test_multiple_choice_loglikelihood_through_the_server_equals_offline(lserve_server: RemoteServer,
                                                                         default_llm: LLM) -> None:
    tok = default_llm.get_tokenizer()
    items = [(tok.encode(q), [tok.encode(q + c)[len(tok.encode(q)):] for c in choices]) for q, choices in QUESTIONS]
    prompts = [ctx + cont for ctx, conts in items for cont in conts]
    with httpx.Client(base_url=lserve_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        r = c.post("/v1/completions", json={"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 0,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    served = [ch["logprobs"]["token_logprobs"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])]
    offline = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                                   use_tqdm=False)
    picks_served, picks_offline, at = [], [], 0
    for ctx, conts in items:
        scores_served, scores_offline = [], []
        for cont in conts:
            n = len(ctx)
            scores_served.append(sum(served[at][n:n + len(cont)]))  # the continuation's tokens of the echo
            ids = offline[at].prompt_token_ids
            scores_offline.append(sum(offline[at].prompt_logprobs[j][ids[j]].logprob for j in range(n, n + len(cont))))
            at += 1
        assert scores_served == pytest.approx(scores_offline, abs=1e-3)
        picks_served.append(max(range(len(conts)), key=scores_served.__getitem__))
        picks_offline.append(max(range(len(conts)), key=scores_offline.__getitem__))
    assert picks_served == picks_offline
    assert sum(p == 0 for p in picks_offline) >= 14  # the model knows most of these (the first choice is right)
