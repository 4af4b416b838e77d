"""`LLM`: the offline Python API in vLLM's shape.

    from lserve import LLM, SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from lserve.config import EngineConfig
from lserve.engine.llm_engine import LLMEngine, Prompt
from lserve.errors import InvalidPromptError
from lserve.request import RequestOutput
from lserve.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    """Load a model once and generate for batches of prompts with continuous batching.

    Every keyword argument is an engine setting (see `lserve.config`); `model=None` loads the
    embedded default model. Sparse-attention fields are validated now; settings this version
    cannot honour raise `NotSupportedError` instead of being ignored.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        attention_backend: str = "auto",
        load_format: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 8192,
        page_size: int | None = None,
        num_kv_pages: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        streaming_sparsity: float = 0.0,
        attn_pattern: str | None = None,
        prefill_sink_tokens: int = 128,
        prefill_local_tokens: int = 8192,
        decode_sink_tokens: int = 128,
        decode_local_tokens: int = 256,
        token_budget: int = 0,
        logical_page_size: int = 16,
        selector_interval: int | None = None,
        num_dense_layers: int = 0,
        **kwargs: Any,
    ) -> None:
        settings = dict(locals())
        for key in ("self", "kwargs", "__class__"):
            settings.pop(key, None)
        settings.update(kwargs)
        self.config = EngineConfig.from_kwargs(**settings)
        self.engine = LLMEngine(self.config)

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine behind this object (vLLM's attribute name)."""
        return self.engine

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a batch; prompts are strings, lists of token ids or
        vLLM's dicts ({"prompt": text} or {"prompt_token_ids": ids}).

        Returns one RequestOutput per prompt, in order. Every prompt is validated before any
        runs, so a bad one raises without leaving work behind.
        """
        batch = _as_prompt_list(prompts)
        return self._run(batch, _as_params_list(sampling_params, len(batch)), use_tqdm, add_special_tokens=True)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a batch, rendered with the tokenizer's chat template."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        texts: list[Prompt] = [self.engine.apply_chat_template(list(c)) for c in conversations]  # type: ignore[arg-type]
        return self._run(texts, _as_params_list(sampling_params, len(texts)), use_tqdm, add_special_tokens=False)

    def _run(
        self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool, add_special_tokens: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        ids: list[str] = []
        groups: list[tuple[str, list[str]]] = []  # per prompt: its request id and its sequences' ids
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    if p.n == 1:
                        rid = engine.add_request(prompt, p, add_special_tokens=add_special_tokens)
                        groups.append((rid, [rid]))
                    else:
                        rid = engine.next_request_id()
                        children = [f"{rid}-{j}" for j in range(p.n)]
                        groups.append((rid, engine.add_parallel_requests(prompt, parallel_params(p), children,
                                                                         add_special_tokens=add_special_tokens)))
                    ids.extend(groups[-1][1])
                except InvalidPromptError as exc:
                    if len(prompts) == 1:
                        raise
                    message = str(exc)
                    named = message.replace("the prompt", f"prompt {i}", 1)
                    raise InvalidPromptError(named if named != message else f"prompt {i}: {message}") from None
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm or len(ids) < 2, unit="req") as bar:
            finals = dict(zip(ids, run_to_completion(engine, ids, bar)))
        return [merge_sequences(rid, [finals[child] for child in children]) for rid, children in groups]


def parallel_params(params: SamplingParams) -> list[SamplingParams]:
    """The `n` sequences' own parameters: n = 1 each, and with a seed, seed + i for sequence i
    (as vLLM), so that each equals a single run with that seed."""
    return [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            for i in range(params.n)]


def merge_sequences(request_id: str, outputs: list[RequestOutput]) -> RequestOutput:
    """One RequestOutput for the sequences of one prompt: the prompt's request id, the first
    sequence's prompt and metrics, and every sequence's completion, numbered by its place."""
    if len(outputs) == 1:
        return outputs[0]
    head = outputs[0]
    completions = [dataclasses.replace(out.outputs[0], index=i) for i, out in enumerate(outputs)]
    return dataclasses.replace(head, request_id=request_id, outputs=completions,
                               finished=all(o.finished for o in outputs))


def run_to_completion(engine: LLMEngine, ids: list[str], bar: Any = None) -> list[RequestOutput]:
    """Step the engine until it has nothing left; the final output of each request in `ids`, in
    order. `bar` (a tqdm bar) moves as each finishes. On any error, including Ctrl-C, the requests
    that had not finished are aborted (their pages freed) before the error propagates."""
    results: dict[str, RequestOutput] = {}
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
    except BaseException:
        for rid in ids:
            if rid not in results:
                engine.abort_request(rid)
        raise
    return [results[rid] for rid in ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    batch = list(prompts)
    if not batch:
        raise ValueError("no prompts given")
    return batch  # type: ignore[return-value]


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    out = list(params)
    if len(out) != n:
        raise ValueError(f"got {len(out)} sampling params for {n} prompts")
    return out
