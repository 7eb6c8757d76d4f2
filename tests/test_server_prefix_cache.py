"""The server's prefix cache: which entry a prompt gets, copies vs in-place reuse, LRU eviction, and
that the logits after reusing a prefix equal transformers' logits for the whole prompt."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers.tiny_models import load_hf_model

from mlx_mixtral import load_model
from mlx_mixtral.cache import KVCache
from mlx_mixtral.prefix_cache import PrefixCache, held_ids

A = [1, 5, 17, 99, 3, 42, 7, 8, 9, 10]
B = A[:4] + [64, 23, 11, 12]  # shares 4 tokens with A


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    return load_hf_model(tiny_hf_dir), load_model(tiny_hf_dir)


def _last_logits(model, cache, ids, kept):
    """Prefill ids[kept:] into `cache`; the logits of the last position."""
    return np.array(model(mx.array(ids[kept:])[None], cache=cache)[0, -1])


def _hf_last_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].numpy()


def test_reused_prefixes_give_transformers_logits(models):
    hf, model = models
    pc = PrefixCache(model.make_cache, capacity=4)
    cache, kept = pc.take(A)
    assert kept == 0
    _last_logits(model, cache, A, kept)
    pc.put(cache, A)

    # Another conversation sharing a prefix gets a copy; A's entry stays whole.
    cache_b, kept_b = pc.take(B)
    assert kept_b == 4 and cache_b is not cache and len(pc) == 1
    np.testing.assert_allclose(_last_logits(model, cache_b, B, kept_b), _hf_last_logits(hf, B), atol=1e-4)
    pc.put(cache_b, B)

    # The next turn of A continues A's own cache in place.
    a2 = A + [30, 31, 32]
    cache_a, kept_a = pc.take(a2)
    assert kept_a == len(A) and cache_a is cache and len(pc) == 1  # taken out while in use
    np.testing.assert_allclose(_last_logits(model, cache_a, a2, kept_a), _hf_last_logits(hf, a2), atol=1e-4)

    # The same prompt again, and a prompt the entry holds more than (an answer regenerated):
    # everything but the last token comes from the cache.
    pc.put(cache_a, a2)
    for ids in (a2, a2[:6]):
        cache_same, kept_same = pc.take(ids)
        assert kept_same == len(ids) - 1
        np.testing.assert_allclose(_last_logits(model, cache_same, ids, kept_same), _hf_last_logits(hf, ids), atol=1e-4)


def test_lru_eviction_and_superseded_entries(models):
    _, model = models
    pc = PrefixCache(model.make_cache, capacity=2)
    for ids in ([1, 2, 3], [1, 4, 5], [1, 6, 7]):
        cache, kept = pc.take(ids)
        _last_logits(model, cache, ids, kept)
        pc.put(cache, ids)
    assert len(pc) == 2
    assert pc.take([1, 2, 3, 9])[1] == 1  # [1, 2, 3] was evicted: only the BOS of another entry is shared
    cache, kept = pc.take([1, 6, 7, 8])
    assert kept == 3
    _last_logits(model, cache, [1, 6, 7, 8], kept)
    pc.put(cache, [1, 6, 7, 8])
    assert len(pc) == 2
    # The same prompt as an entry gets a copy; its answer then supersedes that entry.
    cache, kept = pc.take([1, 6, 7, 8])
    assert kept == 3 and len(pc) == 2
    _last_logits(model, cache, [1, 6, 7, 8], kept)
    pc.put(cache, [1, 6, 7, 8, 40])  # 40 was sampled but never fed: the cache holds [1, 6, 7, 8]
    assert sorted(len(ids) for ids, _ in pc._entries.values()) == [3, 4]  # [1, 4, 5] was not evicted


def test_sliding_window_cache_that_dropped_the_prefix_starts_over(models):
    _, model = models
    pc = PrefixCache(lambda: model.make_cache(4), capacity=2)
    cache, kept = pc.take(A)
    _last_logits(model, cache, A[:-1], kept)
    _last_logits(model, cache, A, len(A) - 1)  # a decode step folds the window into a ring of 4
    pc.put(cache, A)
    fresh, kept = pc.take(A[:6] + [50])  # needs A's keys 0..5, but the window kept only the last 4
    assert kept == 0 and fresh is not cache and fresh[0].offset == 0
    # A continuation of everything it holds still works in place.
    pc.put(cache, A)
    same, kept = pc.take(A + [50])
    assert same is cache and kept == len(A)


def test_held_ids_and_capacity_zero(models):
    _, model = models
    cache = model.make_cache()
    _last_logits(model, cache, A, 0)
    assert held_ids(cache, A + [77]) == A  # the last generated token was never fed
    cache[0].trim(1)
    assert held_ids(cache, A) is None  # layers disagree: an interrupted forward pass
    pc = PrefixCache(model.make_cache, capacity=0)
    pc.put([KVCache()], A)
    assert len(pc) == 0
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(model.make_cache, capacity=-1)
