"""Generation options checked once, whatever they came from (Python keywords, CLI flags, an HTTP
request), and the one rule for how many tokens fit in the context.

`generation_options` returns `stream_generate`'s keyword options or raises an `OptionError` naming
the first bad one, before any model work; the CLI and the server call it with their own field
values and report the error in their own way (a one-line message, a 400).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlx_mixtral.errors import ContextLimitError, OptionError
from mlx_mixtral.grammar import check_structured
from mlx_mixtral.sampling import make_key, make_logits_processors, make_sampler
from mlx_mixtral.speculative import check_speculation, check_unstructured

DEFAULT_MAX_TOKENS = 256


def generation_options(
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = 20,
    logit_bias: Mapping[int, float] | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    logprobs: int = 0,
    json_schema: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool = True,
    num_draft_tokens: int = 3,
    prompt_lookup: int | None = None,
) -> dict[str, Any]:
    """The keyword options of `stream_generate`, checked (the sampler and logits processors they
    describe are built once here and thrown away, so their own checks run). json_schema, tools and
    tool_choice are checked as constrained decoding will enforce them (a SchemaError otherwise).
    Speculative decoding's num_draft_tokens and prompt_lookup must be >= 1; prompt lookup with a
    schema or tools is refused (a draft model is not an option here: stream_generate refuses it)."""
    if max_tokens is not None and max_tokens < 0:
        raise OptionError(f"max_tokens must be >= 0 or None, got {max_tokens}", option="max_tokens")
    if logprobs < 0:
        raise OptionError(f"logprobs must be >= 0, got {logprobs}", option="logprobs")
    make_sampler(temperature, top_p, top_k, min_p)
    make_key(seed)
    make_logits_processors(repetition_penalty, repetition_context_size, dict(logit_bias or {}))
    check_speculation(num_draft_tokens, prompt_lookup)
    structured = check_structured(
        json_schema=json_schema, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls
    )
    if prompt_lookup is not None:
        check_unstructured(structured, "prompt_lookup")
    return dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        logit_bias=dict(logit_bias) if logit_bias else None,
        seed=seed,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        logprobs=logprobs,
        num_draft_tokens=num_draft_tokens,
        prompt_lookup=prompt_lookup,
        **structured,
    )


def fit_to_context(
    prompt_tokens: int, max_tokens: int | None, context_length: int | None, hint: str = ""
) -> int | None:
    """`max_tokens` cut to the room the context leaves after a prompt of `prompt_tokens` (answers
    then end with finish_reason "length" where the context does). ContextLimitError when the prompt
    leaves no room; `hint` (what the caller can do about it) ends its message. A context of None
    (a sliding-window cache, or a model that does not say) never limits."""
    if context_length is None:
        return max_tokens
    room = context_length - prompt_tokens
    if room < 1:
        message = f"the prompt is {prompt_tokens} tokens and the model's context is {context_length} tokens"
        raise ContextLimitError(message + (f"; {hint}" if hint else ""))
    return room if max_tokens is None else min(max_tokens, room)
