"""Request and response bodies of the OpenAI-compatible server (the OpenAPI document is built from them).

Field names, defaults and ranges follow OpenAI's API reference for chat completions, (legacy)
completions and models; a few widely used extensions (top_k, min_p, repetition_penalty) are accepted
as in vLLM and llama.cpp's servers. Requests are validated strictly (a string is not a number), so a
wrong type is a 400 rather than a silent conversion; unknown fields are ignored, as clients send many.
Options whose meaning this server cannot honour (n > 1, echo, suffix, best_of > 1, non-zero
presence/frequency penalties) are rejected rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# OpenAI allows up to 4 stop sequences and 20 top logprobs (5 on the legacy completions endpoint).
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


FinishReason = Literal["stop", "length", "tool_calls"] | None  # None until the last token


# --- errors ------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- requests ----------------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON string")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")
    content: str | list[TextPart] | None = Field(
        None, validate_default=True, description="null only for an assistant's tool calls"
    )

    @field_validator("content")
    @classmethod
    def _content_needed(cls, content: object, info: ValidationInfo) -> object:
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("Field required (null only in an assistant message with tool_calls)")
        return content

    def for_template(self) -> dict:
        """The message as the chat template takes it; text parts stay parts (the tokenizer joins them)."""
        role = "system" if self.role == "developer" else self.role
        content = self.content if not isinstance(self.content, list) else [p.model_dump() for p in self.content]
        message: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if role == "tool":
            message.update(tool_call_id=self.tool_call_id, name=self.name)
        return message


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments")
    strict: bool | None = Field(None, description="arguments always follow `parameters` here (constrained decoding)")


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Request):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, description='required with type "json_schema"')


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Options shared by both generation endpoints."""

    model: str | None = Field(None, description="must name the served model (see GET /v1/models) or be omitted")
    max_tokens: int | None = Field(None, ge=1, description="default: the server's cap, or what the context allows")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="extension: keep the k most likely tokens (0: off)")
    min_p: float | None = Field(None, ge=0.0, lt=1.0, description="extension: min-p filter (0: off)")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="extension: CTRL penalty")
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop sequences")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens when both are set")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, else none"
    )
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = Field(None, description="json_object / json_schema: constrained decoding")


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="text or token ids; a list holds exactly one prompt"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = Field(False, description="not supported: must be false")
    suffix: str | None = Field(None, description="not supported: must be null")
    best_of: int | None = Field(None, ge=1, le=1)


# --- responses ---------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(..., description="prompt tokens taken from the prefix cache instead of computed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason = None


class _Response(BaseModel):
    """The fields every generation response and streamed chunk starts with."""

    id: str
    object: str  # each response's own constant
    created: int
    model: str


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed call: its first delta has the id, type and name, later ones pieces of the arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion (`data: {...}`; the stream ends with
    `data: [DONE]`). With stream_options.include_usage the last chunk has no choices and the usage."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None


class Completion(_Response):
    """A completion; streamed, each server-sent event is one of these with the new text (no usage
    except in the last event when stream_options.include_usage)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx-mixtral"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OffloadHealth(BaseModel):
    """How expert offloading is doing, since the server started."""

    tokens: int
    hit_rate: float = Field(..., description="share of expert uses found in the expert cache")
    bytes_read_per_token: float
    stall_ms_per_token: float = Field(..., description="time generation waited for expert reads")
    prefetch_accuracy: float = Field(..., description="share of prefetched experts that were used")
    lookups: int
    bytes_read: int
    prefetched: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    busy: bool = Field(..., description="a generation is running")
    queued: int = Field(..., description="requests waiting for the generation worker")
    completed: int
    cancelled: int = Field(..., description="generations stopped because their client went away")
    failed: int
    generated_tokens: int
    prompt_cache_entries: int | None = Field(
        ..., description="conversations kept in the prefix cache (null with --distributed)"
    )
    offload: OffloadHealth | None = Field(None, description="expert offloading figures (null when all is resident)")
