"""A small LRU of KV caches keyed by the token ids they hold, for a server whose clients resend the
whole conversation every turn.

A request finds the entry sharing the longest token prefix with its prompt and prefills only the
rest. When the prompt continues everything the entry holds (the next turn of that conversation) the
entry is taken out and used in place; when the entry holds more than the shared prefix (a regenerated
answer, another conversation with the same system prompt) the request gets a copy of the shared
prefix and the entry stays for its own conversation. When the generation ends its cache goes back
in, now holding the prompt plus the answer. An entry in use is out of the LRU (a generation updates
its cache in place), so one cache never serves two requests; only the worker thread touches this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from mlx_mixtral.cache import Cache, KVCache
from mlx_mixtral.chat import common_prefix_length, held_ids, reuse_cache
from mlx_mixtral.errors import OptionError
from mlx_mixtral.generate import GenerationResponse, stream_generate
from mlx_mixtral.language_model import LanguageModel
from mlx_mixtral.tokenizer.core import Tokenizer


class PrefixCache:
    def __init__(self, make_cache: Callable[[], list[Cache]], capacity: int = 4):
        if capacity < 0:
            raise OptionError(f"prompt cache capacity must be >= 0, got {capacity}")
        self.make_cache = make_cache
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[list[int], list[Cache]]] = OrderedDict()  # oldest first
        self._next_key = 0
        self.cached_tokens = 0  # prompt tokens the latest `stream` found cached

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, ids: list[int]) -> tuple[list[Cache], int]:
        """A cache for a prompt of `ids` and how many leading ids it already holds (< len(ids)).
        The caller owns the cache until it `put`s it back."""
        best, best_len = None, 0
        for key, (held, _) in self._entries.items():
            n = common_prefix_length(held, ids)
            if n > best_len:
                best, best_len = key, n
        keep = min(best_len, len(ids) - 1)  # at least the last prompt token is computed: it starts the answer
        if best is None or keep == 0:
            return self.make_cache(), 0
        held, cache = self._entries[best]
        if keep < len(held):
            copy = _prefix_copy(cache, keep)
            if copy is not None:  # (not a use of the entry's own conversation: its LRU place stays)
                return copy, keep
        del self._entries[best]
        kept = reuse_cache(cache, held, ids)
        if kept < 0:  # a sliding-window cache that already dropped what the shorter prefix needs
            return self.make_cache(), 0
        return cache, kept

    def stream(
        self, model: LanguageModel, tokenizer: Tokenizer, ids: list[int], **options: Any
    ) -> Iterator[GenerationResponse]:
        """`stream_generate` for the prompt `ids` through this cache: take the best cached prefix,
        generate the rest, put the cache back, also when the consumer stops early (what went
        through the cache is still valid) but not after a failure. `cached_tokens` is set before
        the first response."""
        cache, self.cached_tokens = self.take(ids)
        fed = list(ids)
        try:
            for response in stream_generate(
                model, tokenizer, ids[self.cached_tokens :], cache=cache, context=ids[: self.cached_tokens], **options
            ):
                fed.append(response.token)
                yield response
        except GeneratorExit:
            self.put(cache, fed)
            raise
        self.put(cache, fed)

    def put(self, cache: list[Cache], fed: list[int]) -> None:
        """Keep `cache` after `fed` went through it, evicting the least recently used entries."""
        held = held_ids(cache, fed)
        if not held or self.capacity == 0:
            return
        # An entry holding a prefix of this one is superseded: this cache serves its requests too.
        for key in [k for k, (ids, _) in self._entries.items() if ids == held[: len(ids)]]:
            del self._entries[key]
        self._entries[self._next_key] = (held, cache)
        self._next_key += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def _prefix_copy(cache: list[Cache], n: int) -> list[Cache] | None:
    """New caches holding the first n positions of `cache` (None for a sliding-window cache, whose
    buffer is not in time order and may have dropped the start)."""
    if not all(isinstance(layer, KVCache) for layer in cache):
        return None
    return [layer.prefix(n) for layer in cache]
