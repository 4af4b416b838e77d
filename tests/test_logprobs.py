"""Log-probabilities of generated and prompt tokens: equal to log_softmax of transformers' logits
on the same weights (the raw distribution, before temperature and penalties), through chunked
prefill and with any sampling settings."""

from __future__ import annotations

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.runner import model_runner

PROMPT = "The capital of France is Paris. The capital of Italy is"


def _reference(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check(entry: dict, token: int, ref_row: torch.Tensor, k: int) -> None:
    assert next(iter(entry)) == token  # the chosen token's entry comes first
    assert entry[token].logprob == pytest.approx(float(ref_row[token]), abs=2e-4)
    assert entry[token].rank == 1 + int((ref_row > ref_row[token]).sum())
    top = torch.topk(ref_row, k)
    ranked = sorted((v.rank, t) for t, v in entry.items() if t != token or v.rank <= k)
    assert [t for _, t in ranked][:k] == top.indices.tolist()
    for t, v in entry.items():
        assert v.logprob == pytest.approx(float(ref_row[t]), abs=2e-4)
        assert isinstance(v.decoded_token, str)


@pytest.mark.parametrize("params", [
    dict(temperature=0.0),
    dict(temperature=1.0, top_k=20, seed=3, repetition_penalty=1.3),  # logprobs stay raw
])
def test_output_and_prompt_logprobs_equal_the_reference(default_llm: LLM, hf_model, params: dict) -> None:
    sp = SamplingParams(max_tokens=6, logprobs=4, prompt_logprobs=3, ignore_eos=True, **params)
    out = default_llm.generate(PROMPT, sp, use_tqdm=False)[0]
    comp = out.outputs[0]
    ids = out.prompt_token_ids + comp.token_ids
    ref = _reference(hf_model, ids)
    n = len(out.prompt_token_ids)
    assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids) == 6
    for j, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        _check(entry, token, ref[n - 1 + j], 4)
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(comp.logprobs, comp.token_ids)))
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == n and out.prompt_logprobs[0] is None
    for j in range(1, n):
        _check(out.prompt_logprobs[j], out.prompt_token_ids[j], ref[j - 1], 3)
    if params["temperature"] == 0.0:
        assert all(e[t].rank == 1 for e, t in zip(comp.logprobs, comp.token_ids))


def test_prompt_logprobs_through_chunked_prefill(hf_model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROB_ROWS", 7)  # several logits blocks per chunk too
    llm = LLM(dtype="float32", device="cpu", max_num_batched_tokens=48, num_kv_pages=16, max_model_len=512)
    prompt = " ".join(f"item {i} costs {i * 7 % 13} coins." for i in range(30))
    plain, scored = llm.generate([prompt, prompt], [SamplingParams(temperature=0, max_tokens=3),
                                                     SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0,
                                                                    logprobs=0)], use_tqdm=False)
    assert len(scored.prompt_token_ids) > 5 * 48  # the prompt took several chunks
    assert plain.prompt_logprobs is None and plain.outputs[0].logprobs is None
    assert scored.outputs[0].token_ids == plain.outputs[0].token_ids
    ref = _reference(hf_model, scored.prompt_token_ids)
    for j in range(1, len(scored.prompt_token_ids)):
        entry = scored.prompt_logprobs[j]
        token = scored.prompt_token_ids[j]
        assert list(entry) == [token]  # k = 0: the token alone
        assert entry[token].logprob == pytest.approx(float(ref[j - 1, token]), abs=2e-4)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_logprob_counts_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
