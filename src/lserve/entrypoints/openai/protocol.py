"""Request and response bodies of the OpenAI-compatible API (OpenAI's names plus vLLM's extras).

These pydantic models are the server's contract: FastAPI validates every body against them and
publishes them in `/openapi.json`. Requests are validated strictly (no "5" for 5, no 1 for true,
no NaN or infinity), so a wrongly typed field is a 400 rather than a silent conversion. Fields
that OpenAI or vLLM define but lserve cannot honour are declared so they show in the schema, and
a value that would change the output is refused by `unsupported_fields` instead of ignored.
Unknown fields are accepted and ignored (with a log line), as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from lserve.sampling_params import MAX_LOGPROBS

MAX_CHOICES = 128
"""The most choices (n, best_of) one request may ask for per prompt (OpenAI's limit)."""

# Upper bound of `repetition_penalty` and lower bound of its inverse: beyond these the float32
# logits overflow to infinity and sampling would fail for the whole batch.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def _integral_float(value: Any) -> Any:
    """JSON has one number type: 4.0 is an integer to JSON Schema, so accept it as 4 (but not 4.5 or "4")."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral_float)]


def _only(**schema: Any) -> dict[str, Any]:
    """Extra JSON Schema keywords documenting the only values lserve accepts for an OpenAI field.

    The server checks these itself (with a message saying what is unsupported); the schema says
    the same so that clients and fuzzers know it.
    """
    return schema


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="send one last chunk with the usage of the whole request")
    continuous_usage_stats: bool = Field(False, description="include the running usage in every chunk (vLLM)")


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(..., alias="schema", description="the JSON schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="a served model name (default: the only model)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy (default 1)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: JsonInt | None = Field(None, ge=-1, description="keep the k most likely tokens; 0 or -1 = off (vLLM)")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="(vLLM)")
    repetition_penalty: float | None = Field(
        None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1], description="1 = off (vLLM)"
    )
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0,
                                           description="subtracted once from the logit of every token generated so far")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0,
                                            description="subtracted per occurrence from the logits of generated tokens")
    seed: JsonInt | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="strings that end the output (not included in it)")
    stop_token_ids: list[Annotated[JsonInt, Field(ge=0)]] | None = Field(
        None, description="token ids that end the output (vLLM)")
    ignore_eos: bool = Field(False, description="keep generating after EOS (vLLM)")
    skip_special_tokens: bool = Field(True, description="(vLLM)")
    n: JsonInt = Field(1, ge=1, le=MAX_CHOICES, description="choices to sample for each prompt; they share the "
                       "prompt's KV, and with a seed choice i draws from seed + i")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit")
    min_tokens: JsonInt = Field(0, ge=0, description="EOS, stop tokens and stop strings end no output shorter (vLLM)")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string in the text (vLLM)")
    allowed_token_ids: list[Annotated[JsonInt, Field(ge=0)]] | None = Field(
        None, description="sample only these tokens (vLLM)", json_schema_extra=_only(minItems=1))
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object (any JSON object) or json_schema (output valid against the schema)")
    guided_json: dict[str, Any] | str | None = Field(None, description="a JSON schema the output follows (vLLM)")
    guided_regex: str | None = Field(None, description="a regular expression the output matches (vLLM)")
    guided_choice: list[str] | None = Field(None, description="the output is one of these strings (vLLM)")
    guided_grammar: str | None = Field(None, description="a Lark or GBNF grammar the output follows (vLLM)")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="one of json, json_object, regex, choice, grammar (vLLM)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="ignored")


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[JsonInt] | list[str] | list[list[JsonInt]] = Field(
        ..., description="a string, a list of token ids, or a list of either (one choice per prompt)"
    )
    max_tokens: JsonInt | None = Field(16, ge=1, description="null: the rest of the context")
    echo: bool = Field(False, description="prepend the prompt to the output text")
    logprobs: JsonInt | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="the log-probability of each token and of the N most likely "
        "ones at each position (with echo, the prompt's tokens too)")
    prompt_logprobs: JsonInt | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="the prompt tokens' log-probabilities and the N most likely at "
        "each position, as vLLM's `prompt_logprobs` (vLLM)")
    best_of: JsonInt | None = Field(None, ge=1, le=MAX_CHOICES, description="sample this many choices per prompt "
                                    "and return the n with the highest cumulative log-probability (not with stream)")
    suffix: str | None = Field(None, description="not supported (must be null or empty)",
                               json_schema_extra=_only(maxLength=0))
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (BOS) (vLLM)")


class ContentPart(_Request):
    type: str = Field(..., description="only 'text' is supported", json_schema_extra=_only(enum=["text"]))
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON text")


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, description="may be null for an assistant's tool calls")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier tool calls")
    tool_call_id: str | None = Field(None, description="for a tool message: the call it answers")


class FunctionDefinition(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., description="the conversation, rendered with the chat template",
                                        json_schema_extra=_only(minItems=1))
    max_completion_tokens: JsonInt | None = Field(None, ge=1, description="default: the rest of the context")
    max_tokens: JsonInt | None = Field(None, ge=1, description="deprecated name of max_completion_tokens")
    logprobs: bool | None = Field(None, description="return the log-probability of each output token")
    top_logprobs: JsonInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                         description="with logprobs: also the N most likely tokens at each position")
    tools: list[Tool] | None = Field(None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required (one call, constrained), or a named function")
    parallel_tool_calls: bool | None = Field(None, description="ignored: every parsed call is returned")
    echo: bool = Field(False, description="not supported (must be false)", json_schema_extra=_only(enum=[False]))
    add_generation_prompt: bool = Field(True, description="end the rendered prompt with the assistant header (vLLM)")
    continue_final_message: bool = Field(False, description="not supported (must be false)",
                                         json_schema_extra=_only(enum=[False]))
    add_special_tokens: bool = Field(False, description="the template already adds them (vLLM)")


class TokenizeRequest(_Request):
    """POST /tokenize: either `prompt` or `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, json_schema_extra=_only(minItems=1))
    add_special_tokens: bool | None = Field(None, description="default: true for prompt, false for messages")
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[JsonInt]


# ---- responses -------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every error: OpenAI's shape with vLLM's type names (BadRequestError, NotFoundError, ...)."""

    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    """With the prefix cache on: the prompt tokens it held."""


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions format: one entry per token (the prompt's first, with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None
    stop_reason: int | str | None = Field(None, description="the stop string or token id that ended the output")
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, description="with `prompt_logprobs`: per prompt token (None for the first), by token id (vLLM)")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class OutputFunctionCall(BaseModel):
    name: str
    arguments: str


class OutputToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: OutputFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[OutputToolCall] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lserve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[JsonInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """GET /tokenizer_info: what lm-eval's remote tokenizer needs."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    max_model_len: int


class VersionResponse(BaseModel):
    version: str


# ---- refusing what cannot be honoured --------------------------------------------------------

# vLLM extras that would change the output; lserve does not implement them. Anything else that
# is unknown is ignored, as vLLM ignores it.
_UNSUPPORTED_EXTRAS = (
    "truncate_prompt_tokens", "bad_words", "logits_processors", "return_token_ids", "chat_template", "chat_template_kwargs",
    "functions", "function_call", "prompt_embeds", "mm_processor_kwargs",
)


def _is_set(value: Any) -> bool:
    """True for a value that asks for something (not null, false, 0, "" or an empty container)."""
    return value not in (None, False, 0, "", [], {})


def unsupported_fields(req: CompletionRequest | ChatCompletionRequest) -> tuple[str, str] | None:
    """(param, message) for the first field whose value lserve cannot honour, or None."""
    checks: list[tuple[str, bool, str]] = [
        ("stream_options", req.stream_options is not None and not req.stream,
         "Stream options can only be defined when `stream=True`."),
    ]
    if isinstance(req, CompletionRequest):
        checks += [
            ("best_of", req.best_of is not None and req.best_of < req.n, "best_of must be greater than or equal to n"),
            ("best_of", req.best_of not in (None, req.n) and req.stream, "best_of cannot be used with stream"),
            ("suffix", _is_set(req.suffix), "suffix is not supported"),
        ]
    else:
        checks += [
            ("top_logprobs", req.top_logprobs is not None and not req.logprobs,
             "top_logprobs needs logprobs set to true"),
            ("prompt_logprobs", (req.model_extra or {}).get("prompt_logprobs") is not None,
             "prompt_logprobs is only supported by /v1/completions"),
            ("tool_choice", req.tool_choice not in (None, "none", "auto") and not req.tools,
             "tool_choice needs tools"),
            ("echo", req.echo, "echo is not supported for chat completions"),
            ("continue_final_message", req.continue_final_message, "continue_final_message is not supported"),
        ]
    for param, bad, message in checks:
        if bad:
            return param, message
    for name in _UNSUPPORTED_EXTRAS:
        if _is_set((req.model_extra or {}).get(name)):
            return name, f"{name} is not supported by lserve"
    return None
