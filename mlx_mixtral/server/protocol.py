"""OpenAI request -> generation options, and generation responses -> OpenAI response objects.

Pure translation, no I/O: the app (app.py) validates and queues, the worker generates, and
the functions here turn one into the other. Shapes follow OpenAI's API reference: chat completions
(`chat.completion`, `chat.completion.chunk`), legacy completions (`text_completion`) and usage with
`prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mlx_mixtral.errors import ContextLimitError, OptionError
from mlx_mixtral.generate import GenerationResponse
from mlx_mixtral.options import fit_to_context, generation_options
from mlx_mixtral.server.schema import MAX_STOP, _Sampling
from mlx_mixtral.tokenizer.core import Tokenizer
from mlx_mixtral.tool_calls import ToolCallStream


class APIError(Exception):
    """An error the client caused (or a server fault), answered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens_cap: int
    context_length: int | None  # None: unbounded (a sliding-window cache, or unknown)
    vocab_size: int


def request_options(
    req: _Sampling,
    prompt_len: int,
    max_tokens: int | None,
    limits: Limits,
    top_logprobs: int | None,
    structured: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """stream_generate's keyword options for a request whose prompt is `prompt_len` tokens and that
    asks for `top_logprobs` alternatives per token (None: no logprobs at all); `structured` the
    checked json_schema/tools options (server/tools.py). What the request gets wrong is a 400
    before anything is queued."""
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise APIError(
            400,
            f"max_tokens is {max_tokens}, above this server's limit of {limits.max_tokens_cap}",
            param="max_tokens",
            code="invalid_value",
        )
    try:
        limit = fit_to_context(
            prompt_len,
            limits.max_tokens_cap if max_tokens is None else max_tokens,
            limits.context_length,
            hint="shorten the messages",
        )
    except ContextLimitError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop has {len(stop)} sequences; at most {MAX_STOP} are allowed", param="stop")
    try:
        return generation_options(
            max_tokens=limit,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty,
            stop=stop,
            # stream_generate reports the chosen token's logprob only with logprobs >= 1.
            logprobs=0 if top_logprobs is None else max(top_logprobs, 1),
            seed=None if req.seed is None else req.seed % 2**64,
            logit_bias=_logit_bias(req.logit_bias, limits.vocab_size),
            **(structured or {}),
        )
    except OptionError as e:
        raise APIError(400, str(e), param=e.option) from None


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not re.fullmatch(r"\d{1,9}", key) or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise APIError(400, f"logit_bias value {value} for token {key} is outside [-100, 100]", param="logit_bias")
        out[int(key)] = value
    return out


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as OpenAI's logprobs show it: its text and bytes (see Tokenizer.token_bytes)."""
    raw = tokenizer.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprob(tokenizer: Tokenizer, r: GenerationResponse, top: int) -> dict[str, Any]:
    text, raw = token_text(tokenizer, r.token)
    alternatives = []
    for token, logprob in (r.top_logprobs or [])[:top]:
        alt_text, alt_raw = token_text(tokenizer, token)
        alternatives.append({"token": alt_text, "logprob": logprob, "bytes": alt_raw})
    return {"token": text, "logprob": r.logprob, "bytes": raw, "top_logprobs": alternatives}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _Answer:
    """One request's answer as it accumulates: the whole response, or the streamed chunks."""

    id_prefix = object_name = chunk_name = ""  # set by each endpoint's subclass

    def __init__(self, model: str, tokenizer: Tokenizer, prompt_tokens: int, top_logprobs: int | None):
        self.model, self.tokenizer, self.prompt_tokens = model, tokenizer, prompt_tokens
        self.top = top_logprobs  # None: no logprobs asked for
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.text: list[str] = []
        self.responses: list[GenerationResponse] = []
        self.last: GenerationResponse | None = None

    def head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def add(self, r: GenerationResponse) -> Any:
        """Record one response; return its logprobs entry (None unless asked for)."""
        self.text.append(r.text)
        self.responses.append(r)
        self.last = r
        return None if self.top is None else self._logprobs(r)

    def _logprobs(self, r: GenerationResponse) -> Any:
        raise NotImplementedError

    def finish_reason(self) -> str:
        return self.last.finish_reason if self.last else "length"

    def usage(self, cached_tokens: int) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.last.generation_tokens if self.last else 0, cached_tokens)

    def opening(self) -> list[str]:
        """Events sent before the first token."""
        return []

    def stream(self, r: GenerationResponse) -> list[str]:
        """Record one response; the events it adds to the stream."""
        raise NotImplementedError

    def usage_chunk(self, cached_tokens: int) -> str:
        return sse({**self.head(self.chunk_name), "choices": [], "usage": self.usage(cached_tokens)})


class ChatAnswer(_Answer):
    """A chat answer; with `calls` (a tool-call parser, when tools are in play) tool-call text
    becomes `tool_calls`, and the generic format's {"response": ...} its content."""

    id_prefix, object_name, chunk_name = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(
        self,
        model: str,
        tokenizer: Tokenizer,
        prompt_tokens: int,
        top_logprobs: int | None,
        calls: ToolCallStream | None = None,
    ):
        super().__init__(model, tokenizer, prompt_tokens, top_logprobs)
        self.logprobs: list[dict[str, Any]] = []
        self.calls = calls
        self.streamed = ""  # content already sent in deltas

    def _logprobs(self, r: GenerationResponse) -> dict[str, Any]:
        entry = chat_logprob(self.tokenizer, r, self.top)
        self.logprobs.append(entry)
        return entry

    def message(self) -> dict[str, Any]:
        if self.calls is None:
            return {"role": "assistant", "content": "".join(self.text)}
        content, tool_calls = self.calls.finish()
        return {"role": "assistant", "content": content, **({"tool_calls": tool_calls} if tool_calls else {})}

    def response(self, cached_tokens: int) -> dict[str, Any]:
        logprobs = {"content": self.logprobs} if self.top is not None else None
        if self.calls is not None:
            for r in self.responses:
                self.calls.feed(r.token, r.text)
        choice = {
            "index": 0,
            "message": self.message(),
            "logprobs": logprobs,
            "finish_reason": self.finish_reason(),
        }
        return {**self.head(self.object_name), "choices": [choice], "usage": self.usage(cached_tokens)}

    def _chunk(
        self, delta: dict[str, Any], logprob: dict[str, Any] | None = None, finish_reason: str | None = None
    ) -> str:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None if logprob is None else {"content": [logprob]},
            "finish_reason": finish_reason,
        }
        return sse({**self.head(self.chunk_name), "choices": [choice]})

    def opening(self) -> list[str]:
        # OpenAI's order: a chunk with the role, content chunks, then one with the finish reason.
        return [self._chunk({"role": "assistant", "content": ""})]

    def stream(self, r: GenerationResponse) -> list[str]:
        logprob = self.add(r)
        if self.calls is None:
            events = [self._chunk({"content": r.text}, logprob)] if r.text or logprob is not None else []
        else:
            events = [self._chunk(d, logprob if i == 0 else None) for i, d in enumerate(self._deltas(r))]
        if r.finish_reason is not None:
            events.append(self._chunk({}, finish_reason=r.finish_reason))
        return events

    def _deltas(self, r: GenerationResponse) -> list[dict[str, Any]]:
        """OpenAI deltas of one response in a tool-call answer: content, or a call's id, type and name
        first, then pieces of its arguments. At the end, content the scanner could not stream (an
        answer that turned out not to be a tool call) goes out whole."""
        out = []
        for d in self.calls.feed(r.token, r.text):
            if d.index is None:
                out.append({"content": d.content})
                self.streamed += d.content
            elif d.name is not None:
                function = {"name": d.name, "arguments": d.arguments}
                out.append({"tool_calls": [{"index": d.index, "id": d.id, "type": "function", "function": function}]})
            else:
                out.append({"tool_calls": [{"index": d.index, "function": {"arguments": d.arguments}}]})
        if r.finish_reason is not None:
            content, tool_calls = self.calls.finish()
            if not tool_calls and content and content.startswith(self.streamed) and content != self.streamed:
                out.append({"content": content[len(self.streamed) :]})
        return out


class CompletionAnswer(_Answer):
    """A legacy completion (`logprobs` as that endpoint reports them)."""

    id_prefix, object_name, chunk_name = "cmpl-", "text_completion", "text_completion"

    def __init__(self, model: str, tokenizer: Tokenizer, prompt_tokens: int, top_logprobs: int | None):
        super().__init__(model, tokenizer, prompt_tokens, top_logprobs)
        self.offset = 0  # characters of text before the next token (counted only with logprobs)
        self.logprobs: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _logprobs(self, r: GenerationResponse) -> dict[str, list]:
        token, _ = token_text(self.tokenizer, r.token)
        top: dict[str, float] = {}
        for alt, logprob in (r.top_logprobs or [])[: self.top]:
            top.setdefault(token_text(self.tokenizer, alt)[0], logprob)
        entry = {"tokens": [token], "token_logprobs": [r.logprob], "top_logprobs": [top], "text_offset": [self.offset]}
        self.offset += len(r.text)
        for key, values in entry.items():
            self.logprobs[key] += values
        return entry

    def _choice(self, text: str, logprobs: dict[str, list] | None, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def response(self, cached_tokens: int) -> dict[str, Any]:
        choice = self._choice("".join(self.text), self.logprobs if self.top is not None else None, self.finish_reason())
        return {**self.head(self.object_name), "choices": [choice], "usage": self.usage(cached_tokens)}

    def stream(self, r: GenerationResponse) -> list[str]:
        logprobs = self.add(r)
        if not (r.text or logprobs is not None or r.finish_reason is not None):
            return []
        return [sse({**self.head(self.chunk_name), "choices": [self._choice(r.text, logprobs, r.finish_reason)]})]
