"""Pure sampling functions and logits processors.

Shapes: B batch (rows sampled independently), V vocab, T tokens seen so far.

A sampler maps log-probabilities `(B, V)` (and an optional PRNG key) to token ids `(B,)`;
a logits processor maps `(tokens (T,), logits (B, V)) -> logits (B, V)`. Neither keeps state,
so the same inputs and key always give the same output. The filters follow transformers'
definitions and order (temperature, then top-k, top-p, min-p, each on the tempered
distribution), so a sampling configuration means the same thing here as there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from mlx_mixtral.errors import OptionError

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class Sampler(Protocol):
    def __call__(self, logprobs: mx.array, key: mx.array | None = None) -> mx.array:
        """(B, V) log-probabilities -> (B,) token ids."""
        ...


def greedy(logprobs: mx.array, key: mx.array | None = None) -> mx.array:
    return mx.argmax(logprobs, axis=-1)  # (B,)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits of each row, -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    dropped = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]  # (B, V - k)
    return mx.put_along_axis(logits, dropped, mx.array(-mx.inf, logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter (Holtzman et al. 2019): keep the most probable tokens until their mass
    reaches p, i.e. a token stays when the mass of the tokens ranked above it is below p.
    This is transformers' TopPLogitsWarper (drop where the ascending cumulative mass <= 1 - p)
    written from the top, which always keeps the most probable token."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)  # (B, V) most probable first
    probs = mx.take_along_axis(mx.softmax(logits, axis=-1, precise=True), order, axis=-1)  # (B, V)
    mass_above = mx.cumsum(probs, axis=-1) - probs  # (B, V)
    keep_sorted = mass_above < p
    keep = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), order, keep_sorted, axis=-1)  # (B, V)
    return mx.where(keep, logits, mx.array(-mx.inf, logits.dtype))


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Min-p filter (Nguyen et al. 2024): drop tokens less probable than min_p times the most
    probable one; in log space, logit < max_logit + log(min_p)."""
    if min_p <= 0.0:
        return logits
    floor = logits.max(axis=-1, keepdims=True) + math.log(min_p)  # (B, 1)
    return mx.where(logits >= floor, logits, mx.array(-mx.inf, logits.dtype))


def warp(logprobs: mx.array, temp: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> mx.array:
    """The logits a sampler draws from: tempered, then filtered (-inf marks dropped tokens)."""
    logits = logprobs.astype(mx.float32) * (1.0 / temp)  # (B, V)
    return apply_min_p(apply_top_p(apply_top_k(logits, top_k), top_p), min_p)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Sampler:
    """A sampler for these settings; `temp == 0` is greedy (argmax) whatever the filters say."""
    if temp < 0 or not math.isfinite(temp):
        raise OptionError(f"temperature must be a finite number >= 0, got {temp}", option="temperature")
    if not 0.0 < top_p <= 1.0:
        raise OptionError(f"top_p must be in (0, 1], got {top_p}", option="top_p")
    if top_k < 0:
        raise OptionError(f"top_k must be >= 0 (0 disables it), got {top_k}", option="top_k")
    if not 0.0 <= min_p < 1.0:
        raise OptionError(f"min_p must be in [0, 1), got {min_p}", option="min_p")
    if temp == 0.0:
        return greedy
    return WarpSampler(temp, top_p, top_k, min_p)


@dataclass(frozen=True)
class WarpSampler:
    """Draws from `sampler_probs` of these settings. It is a value, not a closure, so speculative
    decoding can ask for the distribution it draws from (`sampler_distribution`)."""

    temp: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __call__(self, logprobs: mx.array, key: mx.array | None = None) -> mx.array:
        logits = warp(logprobs, self.temp, self.top_k, self.top_p, self.min_p)  # (B, V)
        return mx.random.categorical(logits, axis=-1, key=key)  # (B,)

    def probs(self, logprobs: mx.array) -> mx.array:
        return sampler_probs(logprobs, self.temp, self.top_p, self.top_k, self.min_p)


def sampler_probs(logprobs: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """(..., V) log-probabilities -> the (..., V) distribution `make_sampler(temp, top_p, top_k, min_p)`
    draws from: the softmax of the warped logits, or a one-hot of the argmax when `temp == 0`."""
    if temp == 0.0:
        return one_hot(mx.argmax(logprobs, axis=-1), logprobs.shape[-1])
    return mx.softmax(warp(logprobs, temp, top_k, top_p, min_p), axis=-1, precise=True)


def one_hot(tokens: mx.array, vocab: int) -> mx.array:
    """(...,) ids -> (..., V) float32 rows with a single 1."""
    return (tokens[..., None] == mx.arange(vocab)).astype(mx.float32)


def sampler_distribution(sampler: Sampler) -> Callable[[mx.array], mx.array] | None:
    """The (..., V) logprobs -> (..., V) probabilities map of a sampler that `make_sampler` built
    (None for any other sampler: what it draws from is unknown)."""
    if sampler is greedy:
        return lambda logprobs: sampler_probs(logprobs, 0.0)
    if isinstance(sampler, WarpSampler):
        return sampler.probs
    return None


def make_key(seed: int | None) -> mx.array | None:
    """The PRNG key of a seed (None: none, a fresh random key is drawn later). MLX seeds are
    unsigned 64-bit integers."""
    if seed is None:
        return None
    if not 0 <= seed < 2**64:
        raise OptionError(f"seed must be in [0, 2**64), got {seed}", option="seed")
    return mx.random.key(seed)


def make_repetition_penalty(penalty: float, context_size: int | None = 20) -> LogitsProcessor:
    """CTRL's repetition penalty (Keskar et al. 2019) as transformers applies it: each token
    that occurred in the last `context_size` tokens (None: all of them) has its logit divided
    by `penalty` when positive and multiplied by it when negative."""
    if not penalty > 0:
        raise OptionError(f"repetition_penalty must be > 0, got {penalty}", option="repetition_penalty")
    if context_size is not None and context_size < 1:
        raise OptionError(
            f"repetition context size must be >= 1 or None, got {context_size}", option="repetition_context_size"
        )

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens if context_size is None else tokens[-context_size:]  # (T,)
        if recent.size == 0:
            return logits
        idx = mx.broadcast_to(recent[None, :], (logits.shape[0], recent.size))  # (B, T)
        seen = mx.take_along_axis(logits, idx, axis=-1)  # (B, T)
        seen = mx.where(seen > 0, seen / penalty, seen * penalty)  # (B, T)
        return mx.put_along_axis(logits, idx, seen, axis=-1)

    return process


def make_logit_bias(bias: dict[int, float]) -> LogitsProcessor:
    """Add a fixed bias to chosen token ids (OpenAI's `logit_bias`; -inf bans a token)."""
    ids = mx.array(list(bias.keys()), mx.int32)  # (N,)
    values = mx.array(list(bias.values()), mx.float32)  # (N,)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        idx = mx.broadcast_to(ids[None, :], (logits.shape[0], ids.size))  # (B, N)
        biased = mx.take_along_axis(logits, idx, axis=-1) + values.astype(logits.dtype)  # (B, N)
        return mx.put_along_axis(logits, idx, biased, axis=-1)

    return process


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = 20,
    logit_bias: dict[int, float] | None = None,
) -> list[LogitsProcessor]:
    processors: list[LogitsProcessor] = []
    if logit_bias:
        processors.append(make_logit_bias(logit_bias))
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors


def top_logprobs(logprobs: mx.array, n: int) -> list[tuple[int, float]]:
    """The n most probable (token, logprob) pairs of a (V,) row, best first (a host sync)."""
    n = min(n, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, kth=n - 1)[:n]  # (n,)
    vals = logprobs[ids]  # (n,)
    pairs = sorted(zip(ids.tolist(), vals.tolist()), key=lambda p: -p[1])
    return [(int(i), float(v)) for i, v in pairs]


def validate_token_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    bad = next((i for i in ids if not 0 <= int(i) < vocab_size), None)
    if bad is not None:
        raise OptionError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")
