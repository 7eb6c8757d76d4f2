"""Incremental decoding through each cache equals the full forward pass, position by position."""

import mlx.core as mx
import numpy as np
import pytest
from helpers.tiny_models import make_hf_checkpoint

from mlx_mixtral import KVCache, RotatingKVCache, load_model, load_prompt_cache, save_prompt_cache
from mlx_mixtral.cache import Cache

TOL = 1e-4  # float32 logits of O(1); a wrong mask/position changes them by O(1e-1)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return load_model(make_hf_checkpoint(tmp_path_factory.mktemp("win"), sliding_window=6, num_key_value_heads=1))


@pytest.fixture(scope="module")
def unbounded(tmp_path_factory):
    return load_model(make_hf_checkpoint(tmp_path_factory.mktemp("full")))


def _ids(n, seed=0, batch=2):
    return mx.array(np.random.default_rng(seed).integers(0, 128, (batch, n)))


def _feed(model, ids, cache, chunks):
    """Feed `ids` in chunks of the given sizes (the last repeats), returning all logits."""
    out, pos, i = [], 0, 0
    while pos < ids.shape[1]:
        size = chunks[min(i, len(chunks) - 1)]
        out.append(model(ids[:, pos : pos + size], cache=cache))
        pos, i = pos + size, i + 1
    return mx.concatenate(out, axis=1)


def _max_err(a, b):
    return float(mx.abs(a - b).max())


@pytest.mark.parametrize("chunks", [[1], [4, 1], [5, 3, 9, 1], [20]])
def test_growing_cache_matches_full_forward(unbounded, chunks):
    ids = _ids(300)  # crosses the cache's 256-position growth step
    cache = unbounded.make_cache()
    assert all(isinstance(c, KVCache) for c in cache)
    assert _max_err(_feed(unbounded, ids, cache, chunks), unbounded(ids)) < TOL
    assert cache[0].offset == 300


@pytest.mark.parametrize("chunks", [[1], [3, 1], [8, 1, 2, 13], [4, 4, 4, 1]])
def test_rotating_cache_matches_sliding_window_past_the_window(windowed, chunks):
    ids = _ids(31, seed=1)  # 5x the window of 6
    cache = windowed.make_cache()
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 6 for c in cache)
    assert _max_err(_feed(windowed, ids, cache, chunks), windowed(ids)) < TOL


def test_max_kv_size_behaves_as_a_sliding_window(tmp_path, unbounded):
    """A user bound on the cache equals the same weights run with that sliding window."""
    windowed_same_weights = load_model(make_hf_checkpoint(tmp_path, sliding_window=5))
    ids = _ids(23, seed=2)
    cache = unbounded.make_cache(max_kv_size=5)
    assert _max_err(_feed(unbounded, ids, cache, [7, 1]), windowed_same_weights(ids)) < TOL


@pytest.mark.parametrize("make", [lambda m: m.make_cache(), lambda m: m.make_cache(max_kv_size=64)])
def test_trim_then_refeed_is_exact(unbounded, make):
    ids = _ids(20, seed=3)
    cache = make(unbounded)
    _feed(unbounded, ids[:, :15], cache, [15])
    assert all(c.trim(6) == 6 for c in cache)
    assert cache[0].offset == 9
    assert _max_err(_feed(unbounded, ids[:, 9:], cache, [2, 1]), unbounded(ids)[:, 9:]) < TOL


def test_rotating_trim_refuses_what_was_dropped(windowed):
    cache = windowed.make_cache()
    _feed(windowed, _ids(10, seed=4), cache, [1])
    assert cache[0].trimmable() == 1  # only the newest token can go without losing needed keys
    assert cache[0].trim(5) == 1 and cache[0].offset == 9


@pytest.mark.parametrize("model_name, chunks", [("unbounded", [9, 1]), ("windowed", [1])])
def test_saved_prompt_cache_continues_identically(tmp_path, request, model_name, chunks):
    model = request.getfixturevalue(model_name)
    ids = _ids(16, seed=5)
    cache = model.make_cache()
    _feed(model, ids[:, :10], cache, chunks)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, cache, {"model": "tiny", "tokens": "10"})
    loaded, meta = load_prompt_cache(path)
    assert meta == {"model": "tiny", "tokens": "10"}
    assert [type(c) for c in loaded] == [type(c) for c in cache] and loaded[0].offset == 10
    assert all(isinstance(c, Cache) for c in loaded)
    assert _max_err(_feed(model, ids[:, 10:], loaded, [1]), model(ids)[:, 10:]) < TOL


def test_load_prompt_cache_rejects_other_files(tmp_path):
    path = tmp_path / "other.safetensors"
    mx.save_safetensors(str(path), {"x": mx.zeros(2)})
    with pytest.raises(ValueError, match="not a prompt cache \\(no 'mlx_mixtral.cache' metadata\\)"):
        load_prompt_cache(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="junk.safetensors: not a prompt cache \\(not a safetensors file\\)"):
        load_prompt_cache(tmp_path / "junk.safetensors")
