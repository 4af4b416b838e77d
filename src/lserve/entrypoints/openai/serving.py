"""The OpenAI endpoints' logic: requests -> engine requests -> responses or server-sent events.

Everything that can be wrong with a request is found before it reaches the engine (model name,
unsupported fields, empty prompts, prompt + max_tokens over the context, sampling values) and
becomes an `APIError` (400/404 with OpenAI's error body), so bad input never reaches a step that
other requests share. Streams hold back the last few characters while a stop string could still
be completing, so no text that a stop string later removes is ever sent.

Tokenizing, chat templates and detokenizing for requests run on the tokenizer thread
(`AsyncEngine.run_tokenizer`) with the server's own copy of the tokenizer, never on the engine
thread, which detokenizes outputs with the engine's copy meanwhile. A text prompt with more
characters than `max_model_len` tokens could ever hold is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from lserve.engine.llm import parallel_params
from lserve.engine.tokenizer import encode_prompt, max_token_chars
from lserve.entrypoints.openai.async_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestStream,
    ShuttingDownError,
)
from lserve.entrypoints.openai.logprobs import (
    chat_logprobs,
    completion_logprobs,
    merge_completion_logprobs,
    prompt_logprobs_by_id,
)
from lserve.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    NamedToolChoice,
    OutputFunctionCall,
    OutputToolCall,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    UsageInfo,
    unsupported_fields,
)
from lserve.entrypoints.openai.tools import ToolCallFormat, render_conversation, tool_call_format
from lserve.errors import RequestRejected
from lserve.request import RequestOutput
from lserve.runner.structured import InvalidGrammarError
from lserve.sampling_params import SamplingParams, StructuredOutputsParams

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered with OpenAI's error body and the given HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# ---- the HTTP connection ---------------------------------------------------------------------


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(request: Request, work: Callable[[], Any]) -> Response:
    """Run a handler, cancelling it when the client disconnects first (its requests are then aborted).

    Starlette never cancels a handler whose client left; without this a non-streaming request
    would keep its KV pages until it finished for nobody.
    """
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # the handler ends at its next await (its `finally` aborts its requests); wait for
            # that before reading its outcome, which is not set until then
            await asyncio.wait({task})
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return task.result()


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop, and call `on_close`, as soon as the client disconnects.

    Starlette only watches for a disconnect under some ASGI versions; this always races the body
    against the client's `http.disconnect`, so a client that leaves during a long prefill (before
    any byte was sent) is noticed at once. `on_close` runs however the response ends, even if the
    body generator never started.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def body() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client vanished while we were sending
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(body)
                await _wait_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()


def sse(data: dict[str, Any] | str) -> str:
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---- helpers ---------------------------------------------------------------------------------


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str  # for echo; "" when not needed
    first_text: str = ""  # the first token's text, for echo with logprobs (it has no log-probability)


def _text_delta(text: str, sent: int, finished: bool, holdback: int) -> tuple[str, int]:
    """The text not yet sent, minus a tail that could still turn into a stop string."""
    end = len(text) if finished else max(sent, len(text) - holdback)
    return text[sent:end], end


def _holdback(params: SamplingParams) -> int:
    return max((len(s) for s in params.stop_strings), default=1) - 1


async def _merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) from several streams as they arrive, until each has finished."""
    pending = {asyncio.ensure_future(s.next()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: pending[t]):
                i = pending.pop(task)
                out = task.result()
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(streams[i].next())] = i
    finally:
        for task in pending:
            task.cancel()


def _best_choices(finals: Sequence[RequestOutput], choices: int, n: int) -> list[int]:
    """Indices of the outputs to return: all of them, or with best_of (`choices` > n) the n of
    each prompt's run of `choices` with the highest cumulative log-probability, best first."""
    if choices == n:
        return list(range(len(finals)))
    keep: list[int] = []
    for start in range(0, len(finals), choices):
        run = range(start, start + choices)
        keep += sorted(run, key=lambda i: -(finals[i].outputs[0].cumulative_logprob or 0.0))[:n]
    return keep


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage block; `prompt_tokens_details.cached_tokens` when the prefix cache held some."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens} if cached_tokens else None}


def _message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them; text parts are joined with newlines (as vLLM does)."""
    if not messages:
        raise APIError(400, "messages must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, "only assistant messages carry tool_calls", f"messages.{i}.tool_calls")
        if m.content is None:
            if not m.tool_calls:
                raise APIError(400, "content may be null only for an assistant's tool calls", f"messages.{i}.content")
            content = ""
        elif isinstance(m.content, str):
            content = m.content
        else:
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"only text content parts are supported, got type {part.type!r}",
                                   f"messages.{i}.content.{j}")
                texts.append(part.text)
            content = "\n".join(texts)
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{**({"id": c.id} if c.id is not None else {}), "type": "function",
                                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _forced_functions(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The functions a `required` or named tool_choice allows."""
    functions = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    if isinstance(req.tool_choice, NamedToolChoice):
        name = req.tool_choice.function.name
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return functions


def _tools_active(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def _arguments(text: str) -> Any:
    """A call's arguments as the templates take them: the parsed JSON object (the text if it is not one)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


PROMPT_CHARS_MARGIN = 4
"""A text prompt is refused untokenized above this many times `max_model_len` x the longest
token's characters: normalisation may drop characters before tokenizing, so the bound is loose."""


class OpenAIServing:
    """Handlers of every endpoint; the FastAPI routes in `api_server` only call these."""

    def __init__(self, engine: AsyncEngine, served_model_names: Sequence[str], model_root: str,
                 max_prompts_per_request: int = 128, tool_call_parser: str = "auto") -> None:
        if not served_model_names:
            raise ValueError("at least one served model name is needed")
        self.engine = engine
        self.llm_engine = engine.engine
        self.served_model_names = list(served_model_names)
        self.model_name = self.served_model_names[0]
        self.model_root = model_root
        self.max_model_len = self.llm_engine.max_model_len
        self.vocab_size = self.llm_engine.core.arch.vocab_size
        self.max_prompts_per_request = max_prompts_per_request
        self.created = int(time.time())
        # the tokenizer thread's own copy: fast tokenizers must not be used from two threads at once
        self.tokenizer = copy.deepcopy(self.llm_engine.tokenizer)
        self.max_prompt_chars = None if self.tokenizer is None \
            else PROMPT_CHARS_MARGIN * self.max_model_len * max_token_chars(self.tokenizer)
        self.tool_format: ToolCallFormat = tool_call_format(
            tool_call_parser, getattr(self.llm_engine.core.arch, "architecture", None), self.tokenizer)

    # ---- checks ------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    def _check_request(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        self.check_model(req.model)
        problem = unsupported_fields(req)
        if problem is not None:
            raise APIError(400, problem[1], problem[0])

    def _structured(self, req: CompletionRequest | ChatCompletionRequest) -> tuple[StructuredOutputsParams | None, str]:
        """The output constraint a request asks for (OpenAI's response_format or one of vLLM's
        guided_* / structured_outputs fields), and the field that asked."""
        asks: list[tuple[str, dict[str, Any]]] = []
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            asks.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs its json_schema", "response_format")
            asks.append(("response_format", {"json": fmt.json_schema.schema_}))
        if isinstance(req, ChatCompletionRequest) and req.tools and req.tool_choice not in (None, "none", "auto"):
            asks.append(("tool_choice", {"grammar": self.tool_format.forced_grammar(_forced_functions(req))}))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(req, name) is not None:
                asks.append((name, {key: getattr(req, name)}))
        if req.structured_outputs is not None:
            so = req.structured_outputs
            fields = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                      "json_object": so.json_object or None}
            asks.append(("structured_outputs", {k: v for k, v in fields.items() if v is not None}))
        if not asks:
            return None, ""
        if len(asks) > 1:
            raise APIError(400, f"give one output constraint, got {', '.join(name for name, _ in asks)}", asks[1][0])
        param, kwargs = asks[0]
        try:
            return StructuredOutputsParams(**kwargs), param
        except ValueError as exc:
            raise APIError(400, str(exc), param) from exc

    @staticmethod
    def _logprob_counts(req: CompletionRequest | ChatCompletionRequest) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) of the engine request: completions' `logprobs` (also for the
        prompt with `echo`) and vLLM's `prompt_logprobs`; chat's `logprobs` with `top_logprobs`."""
        if isinstance(req, ChatCompletionRequest):
            return (req.top_logprobs or 0) if req.logprobs else None, None
        prompt = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            prompt = max(prompt or 0, req.logprobs)
        return req.logprobs, prompt

    def _sampling_params(
        self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_tokens: int | None, prompt_param: str,
        structured: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """SamplingParams with max_tokens resolved against the context (vLLM's wording when it does not fit)."""
        limit = self.max_model_len
        if max_tokens is None:
            if prompt_len >= limit:
                raise APIError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{prompt_len} tokens in the messages, Please reduce the length of the messages.",
                    prompt_param,
                )
            max_tokens = limit - prompt_len
        elif prompt_len + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                "max_tokens" if prompt_len < limit else prompt_param,
            )
        logprobs, prompt_logprobs = self._logprob_counts(req)
        bias = None
        if req.logit_bias:
            try:
                bias = {int(token): value for token, value in req.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
        for param, ids in (("logit_bias", bias or ()), ("allowed_token_ids", req.allowed_token_ids or ())):
            self._check_token_ids(list(ids), param)
        try:
            return SamplingParams(
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=bias,
                allowed_token_ids=req.allowed_token_ids,
                min_tokens=req.min_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                structured_outputs=structured,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None else req.top_k,
                min_p=0.0 if req.min_p is None else req.min_p,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                max_tokens=max_tokens,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                seed=req.seed,
                skip_special_tokens=req.skip_special_tokens,
            )
        except ValueError as exc:  # SamplingParams names the field first in its message
            raise APIError(400, str(exc), str(exc).split(" ", 1)[0]) from exc

    # ---- tokenizer-thread jobs ---------------------------------------------------------------

    def _encode(self, prompt: str | list[int], add_special_tokens: bool, param: str) -> list[int]:
        if isinstance(prompt, str) and self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"the prompt has {len(prompt)} characters, more than that many tokens can hold. "
                           "Please reduce the length of the prompt.", param)
        try:
            return encode_prompt(self.tokenizer, prompt, add_special_tokens)
        except RequestRejected as exc:
            raise APIError(400, str(exc), param) from exc

    def _encode_prompts(self, prompts: list[str | list[int]], add_special_tokens: bool, echo: bool,
                        echo_logprobs: bool = False) -> list[_Prompt]:
        out = []
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            ids = self._encode(p, add_special_tokens, param)
            if not ids:
                raise APIError(400, "the prompt has no tokens", param)
            self._check_token_ids(ids, param)
            text = ""
            if echo:
                text = p if isinstance(p, str) else self._decode(ids)
            out.append(_Prompt(ids, text, self._decode(ids[:1]) if echo_logprobs else ""))
        return out

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of the vocabulary range [0, {self.vocab_size})", param)

    def _decode(self, ids: list[int]) -> str:
        tok = self.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer")
        try:
            return str(tok.decode(ids))
        except Exception as exc:  # e.g. an id the model has a row for but the tokenizer does not know
            raise APIError(400, f"cannot decode these token ids: {exc}", "tokens") from exc

    def _render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, add_special_tokens: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the rendered conversation; tools and tool messages go through the template
        if it knows them, else through the tool-call format's convention (`tools.render_conversation`)."""
        try:
            text = render_conversation(self.tokenizer, self.tool_format, messages, add_generation_prompt, tools)
        except RequestRejected as exc:
            raise APIError(400, str(exc), "messages") from exc
        except Exception as exc:  # a template may raise anything (jinja errors, its own checks) on odd input
            raise APIError(400, f"the chat template cannot render these messages: {exc}", "messages") from exc
        try:
            ids = self._encode(text, add_special_tokens, "messages")
        except APIError as exc:
            raise APIError(400, exc.message.replace("the prompt", "the rendered conversation", 1), "messages") from exc
        if not ids:
            raise APIError(400, "the rendered conversation has no tokens", "messages")
        return ids

    # ---- completions -------------------------------------------------------------------------

    async def create_completion(self, req: CompletionRequest, arrival: float) -> Response:
        self._check_request(req)
        prompts: list[str | list[int]]
        if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)):
            prompts = [req.prompt]  # type: ignore[list-item]
        else:
            prompts = list(req.prompt)  # type: ignore[arg-type]
        if not prompts:
            raise APIError(400, "the prompt must not be empty", "prompt")
        if len(prompts) > self.max_prompts_per_request:
            raise APIError(400, f"a request may hold at most {self.max_prompts_per_request} prompts, got "
                           f"{len(prompts)}", "prompt")
        if len(prompts) * (req.best_of or req.n) > self.max_prompts_per_request:
            raise APIError(400, f"a request may ask for at most {self.max_prompts_per_request} sequences (prompts "
                           f"times n or best_of), got {len(prompts) * (req.best_of or req.n)}",
                           "best_of" if req.best_of else "n")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise APIError(400, "the prompt must not be empty", "prompt" if len(prompts) == 1 else f"prompt.{i}")
        encoded = await self.engine.run_tokenizer(self._encode_prompts, prompts, req.add_special_tokens, req.echo,
                                                  req.echo and req.logprobs is not None)
        structured, grammar_param = self._structured(req)
        params = [self._sampling_params(req, len(p.token_ids), req.max_tokens, "prompt", structured) for p in encoded]
        choices = req.best_of or req.n
        if choices > req.n:  # best_of ranks the choices by their cumulative log-probability
            params = [p if p.logprobs is not None else dataclasses.replace(p, logprobs=0) for p in params]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        model = req.model or self.model_name  # the name the client used, as vLLM answers
        streams = await self._add(request_id, [p.token_ids for p in encoded], params, arrival, grammar_param,
                                  choices)
        prompt_tokens = sum(len(p.token_ids) for p in encoded)
        per_choice = [p for p in encoded for _ in range(choices)]
        if req.stream:  # (best_of is not allowed with stream: every choice streams)
            opts = req.stream_options
            body = self._completion_stream(
                request_id, model, streams, per_choice, [p for p in params for _ in range(choices)], prompt_tokens,
                req, include_usage=bool(opts and opts.include_usage), continuous=bool(opts and opts.continuous_usage_stats),
            )
            return EventStreamResponse(body, self._closer(streams))
        finals = await self._collect(streams)
        picked = [(per_choice[i], finals[i]) for i in _best_choices(finals, choices, req.n)]
        choices_out = [
            CompletionChoice(index=i, text=prompt.text + out.outputs[0].text,
                             finish_reason=out.outputs[0].finish_reason,  # type: ignore[arg-type]
                             stop_reason=out.outputs[0].stop_reason,
                             logprobs=None if req.logprobs is None else self._completion_logprobs(
                                 req.logprobs, prompt, out, 0, len(prompt.text), with_prompt=req.echo)[0],
                             prompt_logprobs=prompt_logprobs_by_id(out.prompt_logprobs)  # type: ignore[arg-type]
                             if req.prompt_logprobs is not None and out.prompt_logprobs is not None else None)
            for i, (prompt, out) in enumerate(picked)
        ]
        completion_tokens = sum(len(out.outputs[0].token_ids) for out in finals)  # best_of: every choice counts
        resp = CompletionResponse(id=request_id, created=int(time.time()), model=model, choices=choices_out,
                                  usage=UsageInfo(**_usage(prompt_tokens, completion_tokens,
                                                           sum(out.num_cached_tokens for out in finals))))
        return Response(resp.model_dump_json(), media_type="application/json")

    @staticmethod
    def _completion_logprobs(k: int, prompt: _Prompt, out: RequestOutput, start: int, offset: int,
                             with_prompt: bool) -> tuple[CompletionLogprobs, int]:
        """The legacy logprobs block of output tokens `start`.. (after the prompt's, `with_prompt`),
        and the character offset after it. `offset` is that of output token `start` in the choice's
        text (the echoed prompt, then the output so far)."""
        comp = out.outputs[0]
        parts = []
        if with_prompt:
            parts.append(completion_logprobs(out.prompt_token_ids, out.prompt_logprobs or [], k, 0, prompt.first_text))
        output = completion_logprobs(comp.token_ids[start:], (comp.logprobs or [])[start:], k, offset)
        parts.append(output)
        end = offset + sum(len(token) for token in output["tokens"])
        return CompletionLogprobs(**merge_completion_logprobs(parts)), end

    async def _completion_stream(
        self, request_id: str, model: str, streams: list[RequestStream], prompts: list[_Prompt],
        params: list[SamplingParams], prompt_tokens: int, req: CompletionRequest,
        include_usage: bool, continuous: bool,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        sent = [0] * len(streams)
        tokens = [0] * len(streams)
        cached = [0] * len(streams)
        holdback = [_holdback(p) for p in params]
        with_logprobs = req.logprobs is not None
        # with logprobs the echo waits for the first output, which brings the prompt's logprobs
        echo_pending = [bool(p.text) and with_logprobs for p in prompts]
        offsets = [len(p.text) for p in prompts]  # of each choice's next token in its text

        def chunk(index: int, text: str, finish: str | None, stop_reason: int | str | None,
                  logprobs: CompletionLogprobs | None = None) -> str:
            data: dict[str, Any] = {
                "id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text,
                             "logprobs": logprobs.model_dump() if logprobs is not None else None,
                             "finish_reason": finish, "stop_reason": stop_reason}],
            }
            if include_usage:
                data["usage"] = _usage(prompt_tokens, sum(tokens)) if continuous else None
            return sse(data)

        try:
            for i, p in enumerate(prompts):
                if p.text and not echo_pending[i]:
                    yield chunk(i, p.text, None, None)
            async for i, out in _merged(streams):
                comp = out.outputs[0]
                first = tokens[i]
                tokens[i] = len(comp.token_ids)
                cached[i] = out.num_cached_tokens
                delta, sent[i] = _text_delta(comp.text, sent[i], out.finished, holdback[i])
                logprobs = None
                if req.logprobs is not None and (tokens[i] > first or echo_pending[i]):
                    logprobs, offsets[i] = self._completion_logprobs(req.logprobs, prompts[i], out, first, offsets[i],
                                                                     with_prompt=echo_pending[i])
                if echo_pending[i]:
                    delta, echo_pending[i] = prompts[i].text + delta, False
                if delta or out.finished or logprobs is not None:
                    yield chunk(i, delta, comp.finish_reason if out.finished else None,
                                comp.stop_reason if out.finished else None, logprobs)
            if include_usage:
                yield sse({"id": request_id, "object": "text_completion", "created": created,
                           "model": model, "choices": [], "usage": _usage(prompt_tokens, sum(tokens), sum(cached))})
        except EngineDeadError as exc:  # the status line (200) is long gone: report it in the stream
            yield sse(error_body(503, str(exc)))
        yield sse("[DONE]")

    # ---- chat completions --------------------------------------------------------------------

    async def create_chat_completion(self, req: ChatCompletionRequest, arrival: float) -> Response:
        self._check_request(req)
        messages = _message_dicts(req.messages)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if _tools_active(req) and req.tools else None
        ids = await self.engine.run_tokenizer(self._render_chat, messages, req.add_generation_prompt,
                                              req.add_special_tokens, tools)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        structured, grammar_param = self._structured(req)
        params = self._sampling_params(req, len(ids), max_tokens, "messages", structured)
        if tools and self.tool_format.keeps_special_tokens:  # its call markers are special tokens
            params = dataclasses.replace(params, skip_special_tokens=False)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        model = req.model or self.model_name
        if req.n > self.max_prompts_per_request:
            raise APIError(400, f"a request may ask for at most {self.max_prompts_per_request} sequences, got {req.n}",
                           "n")
        streams = await self._add(request_id, [ids], [params], arrival, grammar_param, req.n)
        tool_names = {t.function.name for t in req.tools or []} if _tools_active(req) else set()
        if req.stream:
            opts = req.stream_options
            body = self._chat_stream(request_id, model, streams, params, len(ids),
                                     include_usage=bool(opts and opts.include_usage),
                                     continuous=bool(opts and opts.continuous_usage_stats), tool_names=tool_names)
            return EventStreamResponse(body, self._closer(streams))
        finals = await self._collect(streams)
        resp = ChatCompletionResponse(
            id=request_id, created=int(time.time()), model=model,
            choices=[self._chat_choice(i, out, params, tool_names) for i, out in enumerate(finals)],
            usage=UsageInfo(**_usage(len(ids), sum(len(out.outputs[0].token_ids) for out in finals),
                                     sum(out.num_cached_tokens for out in finals))),
        )
        return Response(resp.model_dump_json(), media_type="application/json")

    def _chat_choice(self, index: int, out: RequestOutput, params: SamplingParams, tool_names: set[str]) -> ChatChoice:
        comp = out.outputs[0]
        logprobs = None
        if params.logprobs is not None:
            logprobs = ChatLogprobs(content=chat_logprobs(comp.token_ids, comp.logprobs or [],  # type: ignore[arg-type]
                                                          params.logprobs))
        content, calls = self.tool_format.parse(comp.text, tool_names) if tool_names else (comp.text, [])
        message = AssistantMessage(content=content, tool_calls=[
            OutputToolCall(id=self.tool_format.call_id(),
                           function=OutputFunctionCall(name=c.name, arguments=c.arguments))
            for c in calls])
        return ChatChoice(index=index, message=message, logprobs=logprobs,
                          finish_reason="tool_calls" if calls and comp.finish_reason == "stop"
                          else comp.finish_reason,  # type: ignore[arg-type]
                          stop_reason=comp.stop_reason)

    async def _chat_stream(
        self, request_id: str, model: str, streams: list[RequestStream], params: SamplingParams, prompt_tokens: int,
        include_usage: bool, continuous: bool, tool_names: set[str] | None = None,
    ) -> AsyncIterator[str]:
        """Chat chunks, per choice (index). With tools, a choice's text is held until it ends, when
        the calls in it are parsed: then one chunk carries the content left and the calls (whole
        arguments), the next the finish reason."""
        created = int(time.time())
        tokens = [0] * len(streams)
        sent = [0] * len(streams)
        cached = [0] * len(streams)
        holdback = _holdback(params)

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, stop_reason: int | str | None = None,
                  logprobs: list[dict[str, Any]] | None = None) -> str:
            data: dict[str, Any] = {
                "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta,
                             "logprobs": {"content": logprobs} if logprobs is not None else None,
                             "finish_reason": finish, "stop_reason": stop_reason}],
            }
            if include_usage:
                data["usage"] = _usage(prompt_tokens, sum(tokens)) if continuous else None
            return sse(data)

        try:
            for i in range(len(streams)):
                yield chunk(i, {"role": "assistant", "content": ""})  # OpenAI's first chunk carries the role
            async for i, out in _merged(streams):
                comp = out.outputs[0]
                cached[i] = out.num_cached_tokens
                if tool_names and not out.finished:  # held: calls are parsed from the whole text
                    continue
                if tool_names:
                    content, calls = self.tool_format.parse(comp.text, tool_names)
                    tokens[i] = len(comp.token_ids)
                    delta_calls = [{"index": j, "id": self.tool_format.call_id(), "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments}} for j, c in enumerate(calls)]
                    lps = chat_logprobs(comp.token_ids, comp.logprobs or [], params.logprobs) \
                        if params.logprobs is not None else None
                    yield chunk(i, {"content": content, **({"tool_calls": delta_calls} if calls else {})}, logprobs=lps)
                    reason = "tool_calls" if calls and comp.finish_reason == "stop" else comp.finish_reason
                    yield chunk(i, {}, reason, comp.stop_reason)
                    continue
                first, tokens[i] = tokens[i], len(comp.token_ids)
                delta, sent[i] = _text_delta(comp.text, sent[i], out.finished, holdback)
                logprobs = None
                if params.logprobs is not None and tokens[i] > first:
                    logprobs = chat_logprobs(comp.token_ids[first:], (comp.logprobs or [])[first:], params.logprobs)
                if out.finished:
                    yield chunk(i, {"content": delta} if delta else {}, comp.finish_reason, comp.stop_reason, logprobs)
                elif delta or logprobs:
                    yield chunk(i, {"content": delta}, logprobs=logprobs)
            if include_usage:
                yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": _usage(prompt_tokens, sum(tokens), sum(cached))})
        except EngineDeadError as exc:
            yield sse(error_body(503, str(exc)))
        yield sse("[DONE]")

    # ---- shared request plumbing -------------------------------------------------------------

    async def _add(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams], arrival: float,
        grammar_param: str = "", choices: int = 1,
    ) -> list[RequestStream]:
        """Queue each prompt's `choices` sequences (n or best_of; their parameters from
        `parallel_params`, so choice i draws from seed + i): streams in order, prompt by prompt."""
        prompts = [ids for ids in prompts for _ in range(choices)]
        params = [c for p in params for c in parallel_params(dataclasses.replace(p, n=choices))]
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        try:
            return await self.engine.add_requests(list(zip(ids, prompts, params)), arrival, group_size=choices)
        except InvalidGrammarError as exc:  # compiled with the request, on the engine thread
            raise APIError(400, str(exc), grammar_param or None) from exc
        except RequestRejected as exc:
            raise APIError(400, str(exc), "prompt") from exc

    def _closer(self, streams: list[RequestStream]) -> Callable[[], None]:
        ids = [s.request_id for s in streams]
        return lambda: self.engine.abort(ids)

    async def _collect(self, streams: list[RequestStream]) -> list[RequestOutput]:
        """The final output of every stream; if this is cancelled (client gone) the requests are aborted."""
        finals = []
        try:
            for s in streams:
                out = await s.next()
                while not out.finished:
                    out = await s.next()
                finals.append(out)
        finally:
            self.engine.abort([s.request_id for s in streams])  # a no-op for finished requests
        if any(s.aborted_for_shutdown for s in streams):  # a whole body cannot say "abort" midway
            raise ShuttingDownError("the server shut down before the request finished")
        return finals

    # ---- small endpoints ---------------------------------------------------------------------

    def models(self) -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, created=self.created, root=self.model_root, max_model_len=self.max_model_len)
            for name in self.served_model_names
        ])

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if req.messages is not None:
            messages = _message_dicts(req.messages)
            add_special = bool(req.add_special_tokens)
            ids = await self.engine.run_tokenizer(self._render_chat, messages, req.add_generation_prompt, add_special)
        else:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await self.engine.run_tokenizer(self._encode, req.prompt, add_special, "prompt")
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        self._check_token_ids(req.tokens, "tokens")
        text = await self.engine.run_tokenizer(self._decode, req.tokens)
        return DetokenizeResponse(prompt=text)

    def tokenizer_info(self) -> TokenizerInfoResponse:
        tok = self.llm_engine.tokenizer
        if tok is None:
            raise APIError(404, "this model has no tokenizer")

        def token(name: str) -> str | None:
            value = getattr(tok, name, None)
            return value if isinstance(value, str) else None

        template = getattr(tok, "chat_template", None)
        return TokenizerInfoResponse(
            tokenizer_class=type(tok).__name__, eos_token=token("eos_token"), bos_token=token("bos_token"),
            pad_token=token("pad_token"), chat_template=template if isinstance(template, str) else None,
            max_model_len=self.max_model_len,
        )
