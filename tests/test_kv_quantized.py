"""The quantized KV cache (kv_bits): attention over mx.quantize'd keys/values against float64 math,
its logits against the float cache, and trim, save/load, sliding windows, chat reuse and the planner."""

import math

import mlx.core as mx
import numpy as np
import pytest
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

from mlx_mixtral import ChatSession, KVCache, RotatingKVCache, load, load_model, load_prompt_cache, save_prompt_cache
from mlx_mixtral.config import ModelArgs
from mlx_mixtral.errors import OptionError
from mlx_mixtral.memory.plan import kv_bytes
from mlx_mixtral.model import attention_mask, quantized_attention

# head_dim 32: the smallest group mx.quantize takes is 32
QUANTIZABLE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
# 8-bit keys/values move float32 logits of O(1) by ~4e-3 on these models (measured); a wrong mask,
# position or head grouping moves them by O(1e-1)
KV8_TOL = 1e-2
KV4_MAX_KL = 2e-3  # measured mean KL(float || 4-bit) here: ~1.4e-4 nats per position


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvq")
    full = load_model(make_hf_checkpoint(root / "full", **QUANTIZABLE))
    windowed = load_model(make_hf_checkpoint(root / "win", sliding_window=12, **QUANTIZABLE))
    return full, windowed


def _ids(n, seed=0, batch=2):
    return mx.array(np.random.default_rng(seed).integers(0, 128, (batch, n)))


def _prefill_then_decode(model, ids, cache, prefill):
    outs = [model(ids[:, :prefill], cache=cache)]
    outs += [model(ids[:, i : i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
    return mx.concatenate(outs, axis=1)  # (B, L, V)


def _logprobs(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("length, keys, window", [(5, 12, None), (1, 12, None), (4, 20, 6), (1, 9, 6)])
def test_quantized_attention_is_softmax_attention_over_the_dequantized_cache(bits, length, keys, window):
    rng = np.random.default_rng(bits + length)
    B, H, Hkv, Dh, group = 2, 4, 2, 64, 32
    q = mx.array(rng.standard_normal((B, H, length, Dh)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, Hkv, keys, Dh)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, Hkv, keys, Dh)).astype(np.float32))
    kq, vq = tuple(mx.quantize(k, group, bits)), tuple(mx.quantize(v, group, bits))
    mask = attention_mask(keys - length, length, keys, window)
    got = np.array(quantized_attention(q, kq, vq, Dh**-0.5, mask, group, bits))
    # float64 reference over exactly what the cache holds
    k64 = np.array(mx.dequantize(*kq, group_size=group, bits=bits)).astype(np.float64)
    v64 = np.array(mx.dequantize(*vq, group_size=group, bits=bits)).astype(np.float64)
    k64, v64 = np.repeat(k64, H // Hkv, axis=1), np.repeat(v64, H // Hkv, axis=1)  # (B, H, S, Dh)
    scores = np.einsum("bhld,bhsd->bhls", np.array(q).astype(np.float64), k64) * Dh**-0.5
    q_pos, k_pos = np.arange(keys - length, keys)[:, None], np.arange(keys)[None, :]
    visible = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhls,bhsd->bhld", weights / weights.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["full", "windowed"])
def test_8_bit_logits_are_near_the_float_caches_and_4_bit_kl_is_small(models, which):
    model = models[0] if which == "full" else models[1]
    ids = _ids(40)  # past the 12-token window for the windowed model
    ref = _prefill_then_decode(model, ids, model.make_cache(), 30)
    kv8 = _prefill_then_decode(model, ids, model.make_cache(kv_bits=8, kv_group_size=32), 30)
    kv4 = _prefill_then_decode(model, ids, model.make_cache(kv_bits=4, kv_group_size=32), 30)
    assert float(mx.abs(kv8 - ref).max()) < KV8_TOL
    lp, lq = _logprobs(ref), _logprobs(kv4)
    kl = float((mx.exp(lp) * (lp - lq)).sum(-1).mean())
    assert 0 < kl < KV4_MAX_KL
    if which == "windowed":
        assert isinstance(model.make_cache(kv_bits=8, kv_group_size=32)[0], RotatingKVCache)


@pytest.mark.parametrize("which", ["full", "windowed"])
def test_trim_then_refeed_gives_the_same_logits(models, which):
    model = models[0] if which == "full" else models[1]
    ids = _ids(30, seed=3)
    straight = model.make_cache(kv_bits=8, kv_group_size=32)
    want = model(ids[:, :30], cache=straight)[:, -1]
    cache = model.make_cache(kv_bits=8, kv_group_size=32)
    model(ids[:, :27], cache=cache)
    model(ids[:, 27:29], cache=cache)  # two tokens to take back...
    assert all(layer.trim(2) == 2 for layer in cache)
    got = model(ids[:, 27:30], cache=cache)[:, -1]  # ...and three fed again
    assert cache[0].offset == 30
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_save_and_load_of_a_quantized_cache_continue_exactly(models, tmp_path):
    model = models[1]
    ids = _ids(26, seed=5)
    cache = model.make_cache(kv_bits=4, kv_group_size=32)
    model(ids[:, :20], cache=cache)
    model(ids[:, 20:21], cache=cache)  # a decode step: the window's ring
    save_prompt_cache(tmp_path / "c.safetensors", cache, {"note": "q"})
    loaded, meta = load_prompt_cache(tmp_path / "c.safetensors")
    assert meta == {"note": "q"} and loaded[0].bits == 4 and loaded[0].group_size == 32
    assert isinstance(loaded[0], RotatingKVCache) and loaded[0].offset == 21
    a = _prefill_then_decode(model, ids[:, 21:], cache, 2)
    b = _prefill_then_decode(model, ids[:, 21:], loaded, 2)
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_a_quantized_cache_stores_a_fraction_of_the_float_bytes():
    k = mx.zeros((1, 8, 100, 128))
    for bits, share in ((8, 0.25 + 2 / 64), (4, 0.125 + 2 / 64)):  # float32 here; scale+bias per 64
        cache = KVCache(bits, 64)
        cache.update_and_fetch(k, k)
        stored = sum(part.nbytes for part in cache.state[0])
        assert stored == pytest.approx(k.nbytes * share)


def test_bad_kv_settings_are_one_line_errors(models):
    with pytest.raises(OptionError, match="kv_bits must be one of 4, 8"):
        models[0].make_cache(kv_bits=3)
    with pytest.raises(OptionError, match="kv_group_size 64 does not divide the model's head_dim 32"):
        models[0].make_cache(kv_bits=8, kv_group_size=64)


def test_planner_counts_the_quantized_kv_cache():
    args = ModelArgs.from_dict(
        dict(
            model_type="mixtral",
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=32000,
            max_position_embeddings=32768,
        )  # fmt: skip
    )
    elements = 2 * 32 * 8 * 128 * 32768  # K and V, 32 layers, 8 KV heads of 128, 32k tokens
    assert kv_bytes(args, 32768, 2) == elements * 2 == 4_294_967_296  # the issue's ~4.3 GB
    assert kv_bytes(args, 32768, 2, bits=8, group_size=64) == elements + elements // 64 * 4
    assert kv_bytes(args, 32768, 2, bits=4, group_size=64) == elements // 2 + elements // 64 * 4
    assert math.isclose(kv_bytes(args, 32768, 2, bits=4) / kv_bytes(args, 32768, 2), 0.28125)


def test_chat_prefix_reuse_with_a_quantized_cache_matches_a_fresh_session(tmp_path):
    path = add_tokenizer(make_hf_checkpoint(tmp_path / "m", vocab_size=32000, **QUANTIZABLE))
    model, tokenizer = load(path, kv_bits=8, kv_group_size=32, memory_check="off")
    assert model.make_cache()[0].bits == 8
    chat = ChatSession(model, tokenizer, max_tokens=6)
    "".join(chat.send("Hello there"))
    second = "".join(chat.send("And again?"))  # reuses the first turn's quantized keys
    fresh = ChatSession(model, tokenizer, max_tokens=6)
    fresh.messages = [dict(m) for m in chat.messages[:2]]  # the first turn, no cache behind it
    assert "".join(fresh.send("And again?")) == second
    assert fresh.cache[0].bits == 8 and fresh.cache[0].offset == chat.cache[0].offset
