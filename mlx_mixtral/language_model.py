"""What generation, chat and the server need from a model, as a typed protocol.

`Mixtral` conforms, and so do its sharded form on a distributed group and the test doubles: anything
with the hyper-parameters, a forward pass over token ids that updates one cache per layer, and a
way to make fresh caches. Shapes: B batch, L tokens, V vocab.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx

from mlx_mixtral.cache import Cache
from mlx_mixtral.config import ModelArgs


class LanguageModel(Protocol):
    args: ModelArgs

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        """tokens (B, L) -> logits (B, L, V); `cache` (one per layer) is updated in place."""
        ...

    def make_cache(self, max_kv_size: int | None = None) -> list[Cache]:
        """Fresh per-layer caches (a sliding window of `max_kv_size` tokens when given; stored as the
        model's KV quantization says)."""
        ...


def prefill(model: LanguageModel, tokens: mx.array, cache: list[Cache], chunk: int) -> mx.array:
    """Feed all but the last of `tokens` (L,) into `cache` without computing logits; return the
    last one, (1,), for the caller's first forward with logits. Evaluating the caches' state runs
    just the layers, so the output head (V x D per token) runs for one position only; chunks of
    `chunk` tokens bound the attention scores' memory (L x L per head)."""
    rest = tokens
    while rest.size > 1:
        n = min(chunk, rest.size - 1)
        model(rest[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        rest = rest[n:]
    return rest
