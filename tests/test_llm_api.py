"""The offline API on the default model: prompt forms, sampling, stop rules, errors that lose nothing."""

from __future__ import annotations

import pytest

from lserve import LLM, LServeError, RequestRejected, SamplingParams

pytestmark = pytest.mark.slow


def _all_pages_free(llm: LLM) -> bool:
    kv = llm.engine.core.kv_manager
    return kv.num_free_pages == kv.num_pages and not kv.page_tables


def test_prompt_forms(default_llm) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=5)
    text = default_llm.generate("The capital of France is", greedy, use_tqdm=False)
    ids = default_llm.get_tokenizer().encode("The capital of France is")
    as_ids = default_llm.generate(ids, greedy, use_tqdm=False)
    as_list = default_llm.generate([ids, "The capital of France is"], [greedy, greedy], use_tqdm=False)
    assert len(text) == 1 and len(as_ids) == 1 and len(as_list) == 2
    assert text[0].outputs[0].token_ids == as_ids[0].outputs[0].token_ids == as_list[1].outputs[0].token_ids
    assert as_ids[0].prompt is None and text[0].prompt == "The capital of France is"
    assert text[0].prompt_token_ids == ids
    assert text[0].outputs[0].finish_reason == "length" and len(text[0].outputs[0].token_ids) == 5
    # vLLM's dict forms (TextPrompt, TokensPrompt)
    dicts = default_llm.generate([{"prompt": "The capital of France is"}, {"prompt_token_ids": ids}], greedy,
                                 use_tqdm=False)
    assert [d.outputs[0].token_ids for d in dicts] == [text[0].outputs[0].token_ids] * 2
    assert dicts[0].prompt == "The capital of France is" and dicts[1].prompt is None
    with pytest.raises(RequestRejected, match="'prompt' or 'prompt_token_ids'"):
        default_llm.generate({"prompt": "a", "prompt_token_ids": [1]}, greedy, use_tqdm=False)


def test_stop_string_is_cut_from_text(default_llm) -> None:
    free = default_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert " 6," in free.outputs[0].text
    out = default_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12, stop=" 6,"),
                               use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == " 6,"
    assert c.text == free.outputs[0].text[: free.outputs[0].text.index(" 6,")]
    assert _all_pages_free(default_llm)


def test_stop_token_ids_and_eos(default_llm) -> None:
    chat = default_llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=64),
                            use_tqdm=False)[0]
    eos = default_llm.get_tokenizer().eos_token_id
    assert chat.outputs[0].finish_reason == "stop" and chat.outputs[0].token_ids[-1] == eos
    first = chat.outputs[0].token_ids[0]
    cut = default_llm.chat([{"role": "user", "content": "Say hello."}],
                           SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[first]), use_tqdm=False)[0]
    assert cut.outputs[0].token_ids == [first] and cut.outputs[0].stop_reason == first
    ignored = default_llm.chat([{"role": "user", "content": "Say hello."}],
                               SamplingParams(temperature=0, max_tokens=len(chat.outputs[0].token_ids) + 3,
                                              ignore_eos=True), use_tqdm=False)[0]
    assert ignored.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_varies(default_llm) -> None:
    prompt = "Once upon a time"
    a = default_llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16), use_tqdm=False)
    b = default_llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16), use_tqdm=False)
    c = default_llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=16), use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert a[0].outputs[0].token_ids != c[0].outputs[0].token_ids


def test_top_k_one_is_greedy(default_llm) -> None:
    prompt = "The sky is"
    greedy = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    top1 = default_llm.generate(prompt, SamplingParams(temperature=1.5, top_k=1, max_tokens=8), use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids


def test_repetition_penalty_changes_output(default_llm) -> None:
    prompt = "1, 2, 3, 4,"
    plain = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    penal = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.8),
                                 use_tqdm=False)
    assert plain[0].outputs[0].token_ids != penal[0].outputs[0].token_ids


def test_bad_prompt_in_batch_rejects_everything_and_leaves_nothing(default_llm) -> None:
    too_long = "hello " * 9000
    with pytest.raises(RequestRejected, match="maximum model length"):
        default_llm.generate(["fine prompt", too_long], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(RequestRejected, match="empty"):
        default_llm.generate([[]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(RequestRejected, match="vocabulary"):
        default_llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="sampling params"):
        default_llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    assert not default_llm.engine.has_unfinished_requests()
    assert _all_pages_free(default_llm)


def test_max_tokens_capped_by_model_length() -> None:
    llm = LLM(dtype="float32", device="cpu", max_model_len=256)  # a short window: a quick prompt to fill it
    ids = [1000] * (llm.engine.max_model_len - 3)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    assert _all_pages_free(llm)


def test_abort_frees_pages_at_once(default_llm) -> None:
    engine = default_llm.engine
    rid = engine.add_request("Tell me a long story.", SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    assert engine.core.kv_manager.page_tables
    final = engine.abort_request(rid)
    assert final is not None and final.finished and final.outputs[0].finish_reason == "abort"
    assert _all_pages_free(default_llm) and not engine.has_unfinished_requests()
    assert engine.abort_request(rid) is None


def test_request_that_can_never_fit_is_rejected_not_hung() -> None:
    llm = LLM(page_size=16, num_kv_pages=4)
    with pytest.raises(RequestRejected, match="KV pages"):
        llm.generate("hello " * 100, SamplingParams(max_tokens=8), use_tqdm=False)
    assert _all_pages_free(llm)


def test_bad_sparse_settings_fail_loudly(tmp_path) -> None:
    from tests.helpers_models import hf_config

    hf_config().save_pretrained(str(tmp_path / "tiny"))  # a model with no shipped pattern (the default has one)
    with pytest.raises(LServeError, match="needs a head pattern"):
        LLM(model=str(tmp_path / "tiny"), load_format="dummy", streaming_sparsity=0.5)
    with pytest.raises(ValueError, match="token_budget"):
        LLM(token_budget=100, page_size=64)  # less than two pages
    with pytest.raises(ValueError, match="streaming_sparsity"):
        LLM(streaming_sparsity=2.0)
    with pytest.raises(TypeError, match="did you mean"):
        LLM(page_sise=16)


def test_stop_string_on_the_last_allowed_token_is_a_stop(default_llm) -> None:
    free = default_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    last_piece = default_llm.get_tokenizer().decode(free.outputs[0].token_ids[-1:])
    assert last_piece.strip()
    out = default_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=3, stop=last_piece.strip()),
                               use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop"


def test_tiny_temperature_is_greedy(default_llm) -> None:
    greedy = default_llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    tiny = default_llm.generate("The sky is", SamplingParams(temperature=1e-45, max_tokens=6), use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == tiny[0].outputs[0].token_ids


def test_lone_surrogate_is_a_value_error_naming_the_prompt(default_llm) -> None:
    """Text that is not valid Unicode (a lone surrogate, as JSON's "\\ud800" decodes) is refused
    with a ValueError that names the prompt (its index in a batch), for generate and chat alike,
    and leaves no request behind."""
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match=r"the prompt is not valid Unicode text: a lone surrogate \(U\+D800\) at "
                                         r"character 1$"):
        default_llm.generate("a\ud800b", params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt 1 is not valid Unicode text: a lone surrogate \(U\+DFFF\)"):
        default_llm.generate(["fine", "x\udfff"], params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"the prompt is not valid Unicode text: a lone surrogate \(U\+D800\)"):
        default_llm.chat([{"role": "user", "content": "hi \ud800"}], params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt 1 is not valid Unicode text: a lone surrogate \(U\+D800\)"):
        default_llm.chat([[{"role": "user", "content": "ok"}], [{"role": "user", "content": "hi \ud800"}]], params,
                         use_tqdm=False)
    assert not default_llm.engine.has_unfinished_requests()
    assert _all_pages_free(default_llm)
