"""Text generation: one generator (`generate_step`) and thin wrappers around it.

Shapes: L prompt tokens, T tokens the logits processors see (prompt + generated), V vocab.

`generate_step` works on token ids only: chunked prefill into the KV cache, then a decode loop
that builds step n+1's graph and queues it (`mx.async_eval`) before waiting for token n, so the
host's Python work overlaps the device's. `stream_generate` adds text: tokenization, a streaming
detokenizer, EOS and stop strings, statistics. `generate` joins the stream into one string.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_mixtral.cache import Cache
from mlx_mixtral.errors import OptionError
from mlx_mixtral.grammar import check_structured, make_constraint
from mlx_mixtral.language_model import LanguageModel, prefill
from mlx_mixtral.options import DEFAULT_MAX_TOKENS, fit_to_context
from mlx_mixtral.sampling import (
    LogitsProcessor,
    Sampler,
    greedy,
    make_key,
    make_logits_processors,
    make_sampler,
    top_logprobs,
    validate_token_ids,
)
from mlx_mixtral.speculative import (
    DraftModel,
    DraftStats,
    check_draft_model,
    check_speculation,
    check_unstructured,
    speculative_steps,
)
from mlx_mixtral.tokenizer.core import Tokenizer
from mlx_mixtral.tool_calls import ToolCallStream

DEFAULT_PREFILL_CHUNK = 512


def generate_step(
    prompt_ids: Sequence[int] | mx.array,
    model: LanguageModel,
    *,
    cache: list[Cache] | None = None,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    key: mx.array | None = None,
    draft_model: LanguageModel | None = None,
    num_draft_tokens: int = 3,
    prompt_lookup: int | None = None,
    draft_stats: DraftStats | None = None,
    context: Sequence[int] = (),
) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token, logprobs (V,))` for each new token after `prompt_ids`.

    `cache` may already hold earlier tokens (the prompt then continues them); it is updated in
    place. When the caller stops early, the cache holds the prompt and every yielded token but
    possibly the last; `cache[0].offset` says exactly how many tokens it has seen. Logits
    processors see the prompt ids given here plus the generated ones. `key` seeds the sampler
    (a fresh random key when None); the same key gives the same tokens.

    Speculative decoding (speculative.py) when `draft_model` or `prompt_lookup` is given: each
    round drafts up to `num_draft_tokens` tokens, by prompt lookup (the tokens that followed the
    latest earlier occurrence of the last `prompt_lookup` ids) or else with `draft_model` (same
    vocabulary), and verifies them in one forward pass of `model`. The tokens have the
    distribution plain decoding gives them (greedy: the same tokens), not the same random draws;
    `draft_stats` counts drafted and accepted tokens. The sampler must come from make_sampler.
    `context`: the ids `cache` already holds, for the drafts to look at (prompt lookup finds
    matches there; the draft model reads them).
    """
    prompt = prompt_ids if isinstance(prompt_ids, mx.array) else mx.array(list(prompt_ids), mx.uint32)
    if prompt.ndim != 1 or prompt.size == 0:
        raise OptionError(f"prompt must be a non-empty 1-D sequence of token ids, got shape {tuple(prompt.shape)}")
    if prefill_chunk < 1:
        raise OptionError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if max_tokens is not None and max_tokens < 0:
        raise OptionError(f"max_tokens must be >= 0 or None, got {max_tokens}")
    speculate = draft_model is not None or prompt_lookup is not None
    if speculate:
        check_speculation(num_draft_tokens, prompt_lookup)
        if draft_model is not None:
            check_draft_model(draft_model, model)
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or greedy
    processors = list(logits_processors or ())
    key = mx.random.key(int.from_bytes(os.urandom(4), "little")) if key is None else key
    history = prompt  # (T,) what the logits processors see

    def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history, key
        logits = model(tokens[None], cache=cache)[:, -1, :]  # (1, V)
        for process in processors:
            logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (1, V)
        key, subkey = mx.random.split(key)
        token = sampler(logprobs, subkey)  # (1,)
        if processors:
            history = mx.concatenate([history, token.astype(history.dtype)])  # (T + 1,)
        return token, logprobs[0]

    rest = prefill(model, prompt, cache, prefill_chunk)
    if max_tokens == 0:
        return
    if speculate:
        yield from speculative_steps(
            model,
            cache,
            [*map(int, context), *map(int, prompt.tolist())],
            sampler=sampler,
            processors=processors,
            history=history,
            key=key,
            max_tokens=max_tokens,
            num_draft_tokens=num_draft_tokens,
            draft=None if draft_model is None else DraftModel(draft_model, prefill_chunk),
            prompt_lookup=prompt_lookup,
            stats=DraftStats() if draft_stats is None else draft_stats,
        )
        return

    token, logprobs = step(rest)
    mx.async_eval(token, logprobs)
    n = 0
    while True:
        n += 1
        last = max_tokens is not None and n >= max_tokens
        if not last:
            # Queue step n+1 (it only needs token n as a lazy array) before syncing on token n.
            next_token, next_logprobs = step(token)
            mx.async_eval(next_token, next_logprobs)
        yield int(token.item()), logprobs
        if last:
            return
        token, logprobs = next_token, next_logprobs


@dataclass
class GenerationResponse:
    """One streamed step. `text` is the new text since the previous response (whole UTF-8
    characters only, stop strings never included); `token` is the id sampled at this step."""

    text: str
    token: int
    finish_reason: str | None  # None while running, then "stop" (EOS or stop string), "length" or "tool_calls"
    logprob: float | None  # log-probability of `token` (None unless requested)
    top_logprobs: list[tuple[int, float]] | None  # the n most likely (id, logprob), if requested
    prompt_tokens: int  # tokens prefilled for this request (new tokens only when a cache is reused)
    prompt_tps: float  # prefill speed: prompt_tokens / time to the first token
    generation_tokens: int  # tokens generated so far, this one included
    generation_tps: float  # decode speed after the first token
    peak_memory: float  # GB, mx.get_peak_memory()
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI tool_calls, on the last response of a tool-call answer
    draft_tokens: int = 0  # speculative decoding: tokens drafted so far
    accepted_draft_tokens: int = 0  # ... and how many of them the target model accepted


class StopMatcher:
    """Finds stop strings in streamed text and holds back any tail that could still become one,
    so a stop string split across tokens is never emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = self._held_tail()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_tail(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int] | mx.array) -> list[int]:
    """A prompt as token ids: text is encoded with BOS, ids are taken as given."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.tolist()]
    return [int(t) for t in prompt]


@dataclass
class Request:
    """A prompt and its options as generation runs them: what `stream_generate` (one sequence) and
    the batch scheduler (mlx_mixtral.batching, many) both derive from the same keyword options."""

    ids: list[int]  # prompt ids to prefill (after anything the cache already holds)
    sampler: Sampler
    processors: list[LogitsProcessor]
    key: mx.array | None
    max_tokens: int | None
    text: ResponseText


def prepare_request(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | mx.array,
    *,
    held: int = 0,
    bounded: bool = False,
    speculating: str | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = 20,
    logit_bias: dict[int, float] | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    logprobs: int = 0,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    continuation: bool | None = None,
    json_schema: dict[str, Any] | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    parallel_tool_calls: bool = True,
    tool_format: str | None = None,
) -> Request:
    """Check `stream_generate`'s options and build what runs them. `held` is how many tokens the
    cache already holds before the prompt; `bounded` says the cache is a sliding window (which never
    runs out of context); `speculating` names the speculative option in use, which structured
    output refuses."""
    ids = prompt_ids(tokenizer, prompt)
    validate_token_ids(ids, model.args.vocab_size, "prompt")
    if logprobs < 0:
        raise OptionError(f"logprobs must be >= 0, got {logprobs}")
    sampler = sampler or make_sampler(temperature, top_p, top_k, min_p)
    if logits_processors is None:
        logits_processors = make_logits_processors(repetition_penalty, repetition_context_size, logit_bias)
    structured = check_structured(
        json_schema=json_schema, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls
    )
    if speculating is not None:
        check_unstructured(structured, speculating)
    tool_format = tool_format or tokenizer.tool_format()
    constraint = make_constraint(tokenizer, tool_format=tool_format, **structured)
    processors = list(logits_processors)
    if constraint is not None:  # last: no other processor may lift a token the grammar forbids
        processors.append(constraint)
    calls = None
    if structured["tool_choice"] != "none":
        calls = ToolCallStream(tool_format, tool_token=tokenizer.tool_calls_id)
    if not bounded:  # the same rule as ChatSession and the server
        max_tokens = fit_to_context(
            held + len(ids),
            max_tokens,
            model.args.max_position_embeddings,
            hint="shorten the prompt, or pass cache=model.make_cache(max_kv_size=N) for a sliding window",
        )
    text = ResponseText(
        tokenizer,
        prompt_tokens=len(ids),
        max_tokens=max_tokens,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        logprobs=logprobs,
        continuation=isinstance(prompt, str) if continuation is None else continuation,
        calls=calls,
    )
    return Request(ids, sampler, processors, make_key(seed), max_tokens, text)


class ResponseText:
    """Turns one sequence's sampled tokens into `GenerationResponse`s: streaming detokenization,
    EOS, stop strings, max_tokens, tool calls, logprobs and speed statistics."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        stop: Sequence[str],
        logprobs: int,
        continuation: bool,
        calls: ToolCallStream | None,
    ):
        self.prompt_tokens, self.max_tokens, self.logprobs, self.calls = prompt_tokens, max_tokens, logprobs, calls
        self.matcher = StopMatcher(stop)
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.detok = tokenizer.detokenizer(continuation=continuation)
        self.start = time.perf_counter()
        self.first = self.prompt_tps = 0.0
        self.n = 0  # tokens generated so far
        self.drafts = DraftStats()  # speculative decoding's counts; the decoding loop updates them

    def respond(self, token: int, token_logprobs: mx.array) -> GenerationResponse:
        """The response for the next generated token (`token_logprobs`: (V,)); its finish_reason is
        set when the sequence ends with it."""
        self.n += 1
        n, now = self.n, time.perf_counter()
        if n == 1:
            self.first = now
            self.prompt_tps = self.prompt_tokens / max(now - self.start, 1e-9)
        matcher, finish = self.matcher, None
        if token in self.eos:
            text, finish = matcher.feed(self.detok.finalize())[0] + matcher.flush(), "stop"
        else:
            text, stopped = matcher.feed(self.detok.add_token(token))
            if stopped:
                finish = "stop"
            elif self.max_tokens is not None and n >= self.max_tokens:
                tail, stopped = matcher.feed(self.detok.finalize())
                text, finish = text + tail + ("" if stopped else matcher.flush()), ("stop" if stopped else "length")
        tool_calls = None
        if self.calls is not None:
            self.calls.feed(token, text)
            if finish is not None:
                tool_calls = self.calls.finish()[1]
                finish = "tool_calls" if tool_calls and finish == "stop" else finish
        return GenerationResponse(
            text=text,
            token=token,
            finish_reason=finish,
            logprob=float(token_logprobs[token].item()) if self.logprobs else None,
            top_logprobs=top_logprobs(token_logprobs, self.logprobs) if self.logprobs else None,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / (now - self.first) if n > 1 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            tool_calls=tool_calls,
            draft_tokens=self.drafts.drafted,
            accepted_draft_tokens=self.drafts.accepted,
        )


def stream_generate(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | mx.array,
    *,
    cache: list[Cache] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    draft_model: LanguageModel | None = None,
    num_draft_tokens: int = 3,
    prompt_lookup: int | None = None,
    context: Sequence[int] = (),
    **options: Any,
) -> Iterator[GenerationResponse]:
    """Stream the completion of `prompt` (text, encoded with BOS, or token ids used as given).

    Options (keywords): max_tokens, temperature, top_p, top_k, min_p, repetition_penalty,
    repetition_context_size, logit_bias, seed, stop, logprobs, sampler, logits_processors,
    continuation, json_schema, tools, tool_choice, parallel_tool_calls, tool_format.

    `continuation` keeps the first token's word-boundary space (" mat" after "The cat sat on the"),
    as text that continues the prompt needs; without it the answer is decoded as a text of its
    own, as a chat answer after [/INST] is ("Hello", not " Hello"). Default: True for a text
    prompt, False for token ids (chat templates produce ids).

    Stops at any of `tokenizer.eos_token_ids`, at a `stop` string (never emitted, even when
    split across tokens), after `max_tokens`, or where the model's context
    (`max_position_embeddings`) ends when the cache keeps every token (finish_reason "length";
    a prompt that leaves no room is a ContextLimitError); a sliding-window cache
    (`model.make_cache(max_kv_size=N)`) never runs out of room. `logprobs=n` adds each token's
    log-probability and the n most likely alternatives. `sampler`/`logits_processors` replace
    the ones the keyword options would build.

    Structured output by constrained decoding (grammar.py): `json_schema` holds the answer to one
    JSON value of that schema; `tools` (OpenAI definitions, for a prompt that lists them, see
    `Tokenizer.apply_chat_template(tools=)`) with `tool_choice` ("auto", "none", "required" or
    {"type": "function", "function": {"name": ...}}) and `parallel_tool_calls` hold it to the tool
    format (`tool_format`, default `tokenizer.tool_format()`). A tool-call answer's last response
    has `tool_calls` (OpenAI's objects) and finish_reason "tool_calls"; `text` is the raw answer.

    Speculative decoding with `draft_model`, `num_draft_tokens` and `prompt_lookup` as for
    `generate_step` (not with json_schema or tools); `context` are the ids `cache` already holds,
    which the drafts look at too. Responses count `draft_tokens` and `accepted_draft_tokens`.
    """
    cache = model.make_cache() if cache is None else cache
    bounded = any(layer.max_size is not None for layer in cache)
    held = cache[0].offset if cache else 0
    speculating = "draft_model" if draft_model is not None else "prompt_lookup" if prompt_lookup is not None else None
    request = prepare_request(model, tokenizer, prompt, held=held, bounded=bounded, speculating=speculating, **options)
    steps = generate_step(
        request.ids,
        model,
        cache=cache,
        sampler=request.sampler,
        logits_processors=request.processors,
        prefill_chunk=prefill_chunk,
        max_tokens=request.max_tokens,
        key=request.key,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        prompt_lookup=prompt_lookup,
        draft_stats=request.text.drafts,
        context=context,
    )
    for token, token_logprobs in steps:
        response = request.text.respond(token, token_logprobs)
        yield response
        if response.finish_reason is not None:
            return


def generate(model: LanguageModel, tokenizer: Tokenizer, prompt: str | Sequence[int] | mx.array, **kwargs: Any) -> str:
    """The whole completion as one string; keyword options as for `stream_generate`."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
