"""Generating many prompts together: `batch_generate` and its streaming form."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import mlx.core as mx

from mlx_mixtral.batching.scheduler import DEFAULT_MAX_BATCH, BatchGenerator
from mlx_mixtral.errors import OptionError
from mlx_mixtral.generate import DEFAULT_PREFILL_CHUNK, GenerationResponse
from mlx_mixtral.language_model import LanguageModel
from mlx_mixtral.tokenizer.core import Tokenizer

Prompt = str | Sequence[int] | mx.array


def stream_batch_generate(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    *,
    options: Sequence[Mapping[str, Any]] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_kv_size: int | None = None,
    **common: Any,
) -> Iterator[tuple[int, GenerationResponse]]:
    """Yield `(prompt index, response)` as each sequence produces tokens, up to `max_batch` of
    them decoded together. `common` are `stream_generate`'s keyword options for every prompt;
    `options`, one dict per prompt, adds or overrides options for that prompt. A prompt is text
    (encoded with BOS) or token ids. `max_kv_size` gives every sequence a sliding window of that
    many tokens. Every request is checked before any generation starts."""
    if options is not None and len(options) != len(prompts):
        raise OptionError(f"options: {len(options)} option dicts for {len(prompts)} prompts; give one per prompt")
    generator = BatchGenerator(
        model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk, max_kv_size=max_kv_size
    )
    index = {}
    for i, prompt in enumerate(prompts):
        own = {**common, **(options[i] if options is not None else {})}
        index[generator.add(prompt, **own)] = i
    while generator.busy:
        for event in generator.step():
            if event.error is not None:
                raise event.error
            if event.response is not None:
                yield index[event.uid], event.response


def batch_generate(model: LanguageModel, tokenizer: Tokenizer, prompts: Sequence[Prompt], **options: Any) -> list[str]:
    """Each prompt's whole completion, in prompt order; options as for `stream_batch_generate`.
    Each sequence's tokens are the ones it would get alone (greedy exactly, up to float rounding;
    a seeded sampler draws the same tokens whatever its companions)."""
    texts = [[] for _ in prompts]
    for i, response in stream_batch_generate(model, tokenizer, prompts, **options):
        texts[i].append(response.text)
    return ["".join(pieces) for pieces in texts]
