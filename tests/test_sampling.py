"""Samplers and logits processors against float64 numpy and transformers' own warpers."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_mixtral.sampling import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logit_bias,
    make_repetition_penalty,
    make_sampler,
    top_logprobs,
    warp,
)

V = 50


def _logits(seed, rows=3, scale=2.0):
    return np.random.default_rng(seed).normal(size=(rows, V)) * scale


def _kept(x):
    return np.isfinite(np.asarray(x, dtype=np.float64))


# --- float64 numpy references, written from the definitions -----------------------------------
def _np_top_k(x, k):
    kth = np.sort(x, axis=-1)[:, -k][:, None]
    return x >= kth


def _np_top_p(x, p):
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = np.zeros_like(x, dtype=bool)
    for r in range(x.shape[0]):
        order = np.argsort(-probs[r])
        mass_above = np.cumsum(probs[r][order]) - probs[r][order]
        keep[r, order[mass_above < p]] = True
    return keep


def _np_min_p(x, m):
    probs = np.exp(x - x.max(-1, keepdims=True))
    return probs >= m * probs.max(-1, keepdims=True)


@pytest.mark.parametrize("k", [1, 5, 17, V])
def test_top_k_keeps_the_k_largest(k):
    x = _logits(k)
    out = np.array(apply_top_k(mx.array(x, mx.float32), k))
    np.testing.assert_array_equal(_kept(out), _np_top_k(x, k))
    np.testing.assert_allclose(out[_kept(out)], x[_kept(out)], rtol=1e-6)  # kept logits untouched


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    x = _logits(int(p * 1000))
    out = np.array(apply_top_p(mx.array(x, mx.float32), p))
    np.testing.assert_array_equal(_kept(out), _np_top_p(x, p))


@pytest.mark.parametrize("m", [0.01, 0.1, 0.5, 0.9])
def test_min_p_drops_tokens_below_fraction_of_best(m):
    x = _logits(int(m * 100) + 7)
    out = np.array(apply_min_p(mx.array(x, mx.float32), m))
    np.testing.assert_array_equal(_kept(out), _np_min_p(x, m))


@pytest.mark.parametrize(
    "temp,top_k,top_p,min_p",
    [
        (0.7, 10, 0.8, 0.0),
        (1.3, 0, 0.6, 0.05),
        (0.5, 20, 1.0, 0.2),
        (1.0, 4, 0.99, 0.0),
        (2.0, 30, 0.9, 0.1),
        (1.0, 0, 0.5, 0.3),
        (0.8, 25, 0.7, 0.15),
    ],
)
def test_filter_chain_matches_transformers_warpers(temp, top_k, top_p, min_p):
    """Same tokens survive, in transformers' order: temperature, top-k, top-p, min-p."""
    x = _logits(11, rows=4)
    ref = torch.tensor(x, dtype=torch.float64)
    for warper in (
        [TemperatureLogitsWarper(temp)]
        + ([TopKLogitsWarper(top_k)] if top_k else [])
        + [TopPLogitsWarper(top_p)] * (top_p < 1)
        + ([MinPLogitsWarper(min_p)] if min_p else [])
    ):
        ref = warper(None, ref)
    ours = warp(mx.array(x, mx.float32), temp, top_k, top_p, min_p)
    np.testing.assert_array_equal(_kept(np.array(ours)), np.isfinite(ref.numpy()))


def _frequencies(sampler, logprobs, n, key):
    rows = mx.broadcast_to(mx.array(logprobs, mx.float32)[None], (n, logprobs.size))
    tokens = np.array(sampler(rows, key))
    return np.bincount(tokens, minlength=logprobs.size) / n


@pytest.mark.parametrize("temp,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (1.5, 6, 0.9, 0.02)])
def test_sample_frequencies_follow_the_filtered_distribution(temp, top_k, top_p, min_p):
    x = np.random.default_rng(3).normal(size=V) * 1.5
    logprobs = x - np.log(np.exp(x).sum())
    # Expected distribution in float64: temper, filter, renormalize.
    t = logprobs / temp
    keep = np.ones(V, bool)
    if top_k:
        keep &= _np_top_k(t[None], top_k)[0]
    t = np.where(keep, t, -np.inf)
    if top_p < 1:
        keep &= _np_top_p(np.where(keep, t, -1e30)[None], top_p)[0]
    t = np.where(keep, t, -np.inf)
    if min_p:
        keep &= _np_min_p(np.where(keep, t, -1e30)[None], min_p)[0]
    expected = np.where(keep, np.exp(t - t[keep].max()), 0.0)
    expected /= expected.sum()
    n = 40000
    freq = _frequencies(make_sampler(temp, top_p, top_k, min_p), logprobs, n, mx.random.key(0))
    assert np.all(freq[~keep] == 0)  # filtered tokens are never drawn
    # 5 standard errors per token: a wrong temperature or an unnormalized mask is far outside.
    tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-4
    assert np.all(np.abs(freq - expected) <= tol), np.abs(freq - expected).max()


def test_temperature_zero_is_argmax_whatever_the_filters():
    x = mx.array(_logits(5), mx.float32)
    np.testing.assert_array_equal(np.array(make_sampler(0.0, top_p=0.1, top_k=3)(x)), np.argmax(np.array(x), -1))


def test_same_key_same_tokens_other_key_other_tokens():
    sampler = make_sampler(1.0)
    rows = mx.array(np.zeros((64, V)), mx.float32)  # uniform: every draw is pure randomness
    a, b = sampler(rows, mx.random.key(7)), sampler(rows, mx.random.key(7))
    c = sampler(rows, mx.random.key(8))
    np.testing.assert_array_equal(np.array(a), np.array(b))
    assert not np.array_equal(np.array(a), np.array(c))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    x = _logits(9, rows=2)
    tokens = [3, 7, 7, 11, 40, 3, 25]  # repeats count once, as in transformers
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([tokens] * 2), torch.tensor(x, dtype=torch.float64))
    out = make_repetition_penalty(penalty, context_size=None)(mx.array(tokens), mx.array(x, mx.float32))
    np.testing.assert_allclose(np.array(out), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_repetition_penalty_window_only_sees_recent_tokens():
    x = np.abs(_logits(10, rows=1)) + 0.1  # all positive: penalized logits shrink
    tokens = [1, 2, 3, 4, 5]
    out = np.array(make_repetition_penalty(2.0, context_size=2)(mx.array(tokens), mx.array(x, mx.float32)))
    changed = set(np.flatnonzero(~np.isclose(out[0], x[0])))
    assert changed == {4, 5}
    np.testing.assert_allclose(out[0, [4, 5]], x[0, [4, 5]] / 2.0, rtol=1e-6)


def test_logit_bias_adds_and_bans():
    x = _logits(12, rows=2)
    out = np.array(make_logit_bias({4: 2.5, 9: -math.inf})(mx.array([0]), mx.array(x, mx.float32)))
    expected = x.copy()
    expected[:, 4] += 2.5
    expected[:, 9] = -np.inf
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert np.all(np.array(make_sampler(0.0)(mx.array(out))) != 9)


def test_top_logprobs_are_the_n_best_in_order():
    x = _logits(13, rows=1)[0]
    lp = x - np.log(np.exp(x).sum())
    got = top_logprobs(mx.array(lp, mx.float32), 4)
    order = np.argsort(-lp)[:4]
    assert [i for i, _ in got] == order.tolist()
    np.testing.assert_allclose([v for _, v in got], lp[order], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(temp=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.0), "min_p"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_sampler(**{"temp": 1.0, **kwargs})
