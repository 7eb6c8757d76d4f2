"""Speculative decoding: cheap drafts, verified by the target model in one forward pass.

Shapes: K draft tokens in a round, V vocab, T tokens the logits processors see.

A round proposes K tokens d1..dK, from a small draft model or by prompt lookup (the tokens that
followed the latest earlier occurrence of the last n tokens), runs the target once over
[last, d1..dK] (K + 1 positions) and keeps the drafts the acceptance rule lets through plus one
token of the target's own, so a round yields 1..K+1 tokens whose distribution is exactly that of
plain sampling: speculative sampling, Leviathan et al. 2023 ("Fast Inference from Transformers via
Speculative Decoding") and Chen et al. 2023 ("Accelerating Large Language Model Decoding with
Speculative Sampling"). The target's cache then forgets the rejected drafts (`Cache.trim`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_mixtral.cache import Cache
from mlx_mixtral.errors import OptionError
from mlx_mixtral.language_model import LanguageModel, prefill
from mlx_mixtral.sampling import LogitsProcessor, Sampler, greedy, one_hot, sampler_distribution

Distribution = Callable[[mx.array], mx.array]  # (..., V) logprobs -> (..., V) probabilities


@dataclass
class DraftStats:
    """Counts over a generation: tokens proposed, and how many of them the target accepted."""

    drafted: int = 0
    accepted: int = 0


def accept_drafts(p: mx.array, q: mx.array, draft: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
    """The speculative sampling rule. Leading dimensions are independent rounds.

    p (..., K+1, V): the target's distribution at each position, q (..., K, V): the distribution
    each draft token was drawn from (one-hot for prompt lookup), draft (..., K): the tokens.
    Draft i is accepted while u_i < p_i(d_i) / q_i(d_i), u_i uniform in [0, 1); at the first
    rejection the token is drawn from max(0, p_i - q_i) renormalised, which puts back exactly the
    mass the drafts took from p_i; when all K are accepted a bonus token is drawn from p_{K+1}.
    Returns (accepted drafts n (...,), the token for position n (...,)).
    """
    K = draft.shape[-1]
    u_key, token_key = mx.random.split(key)
    ids = draft[..., None].astype(mx.int32)  # (..., K, 1)
    p_d = mx.take_along_axis(p[..., :K, :], ids, axis=-1)[..., 0]  # (..., K)
    q_d = mx.take_along_axis(q, ids, axis=-1)[..., 0]  # (..., K)
    u = mx.random.uniform(shape=p_d.shape, key=u_key)  # (..., K)
    ok = u * q_d < p_d  # u < p/q without dividing by a q that may round to 0
    n = mx.cumprod(ok.astype(mx.int32), axis=-1).sum(axis=-1)  # (...,) leading accepted drafts
    # Position K has no draft: its q is 0, so its "residual" is p_{K+1} itself, the bonus draw.
    q_all = mx.concatenate([q, mx.zeros((*q.shape[:-2], 1, q.shape[-1]), q.dtype)], axis=-2)  # (..., K+1, V)
    at_n = n[..., None, None]  # (..., 1, 1)
    residual = mx.take_along_axis(mx.maximum(p - q_all, 0.0), at_n, axis=-2)[..., 0, :]  # (..., V)
    p_n = mx.take_along_axis(p, at_n, axis=-2)[..., 0, :]  # (..., V)
    # p == q leaves no residual mass (then rejection has probability 0 but rounding can still
    # reject): draw from p, which is q there.
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p_n)
    token = mx.random.categorical(mx.log(residual), axis=-1, key=token_key)  # (...,)
    return n, token


def accept_greedy(target: mx.array, draft: mx.array) -> tuple[mx.array, mx.array]:
    """The rule for an argmax sampler: target (..., K+1) argmax ids, draft (..., K). Drafts are
    accepted while they equal the target's argmax; the token is the argmax at the first mismatch
    (or the bonus position). Returns (accepted n (...,), token (...,))."""
    K = draft.shape[-1]
    same = target[..., :K] == draft.astype(target.dtype)  # (..., K)
    n = mx.cumprod(same.astype(mx.int32), axis=-1).sum(axis=-1)  # (...,)
    return n, mx.take_along_axis(target, n[..., None], axis=-1)[..., 0]


def lookup(ids: Sequence[int], n: int, k: int) -> list[int]:
    """Prompt lookup: up to k tokens that followed the most recent earlier occurrence of the last n
    ids (prompt and generated), or none when the n-gram has not occurred before."""
    if k < 1 or len(ids) <= n:
        return []
    tail = list(ids[-n:])
    for start in range(len(ids) - n - 1, -1, -1):
        if ids[start + n - 1] == tail[-1] and list(ids[start : start + n]) == tail:
            return list(ids[start + n : start + n + k])
    return []


def check_speculation(num_draft_tokens: int, prompt_lookup: int | None) -> None:
    if num_draft_tokens < 1:
        raise OptionError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}", option="num_draft_tokens")
    if prompt_lookup is not None and prompt_lookup < 1:
        raise OptionError(
            f"prompt_lookup (the n-gram length to look up) must be >= 1, got {prompt_lookup}", option="prompt_lookup"
        )


def check_unstructured(structured: dict[str, Any], option: str) -> None:
    """Refuse speculation (set by `option`) with structured output (`check_structured`'s dict):
    the grammar matcher that enforces json_schema or tools moves forward only and cannot take
    back rejected drafts."""
    if structured["json_schema"] is not None or (structured["tools"] and structured["tool_choice"] != "none"):
        raise OptionError(
            f"{option} (speculative decoding) does not work with json_schema or tools: their grammar matcher "
            "cannot take back rejected drafts",
            option=option,
        )


def check_draft_model(draft: LanguageModel, target: LanguageModel) -> None:
    ours, theirs = draft.args.vocab_size, target.args.vocab_size
    if ours != theirs:
        raise OptionError(
            f"the draft model's vocab_size {ours} differs from the target model's {theirs}; "
            "a draft must share the target's tokenizer",
            option="draft_model",
        )


def processed(logits: mx.array, history: mx.array, processors: Sequence[LogitsProcessor]) -> mx.array:
    """(1, V) logits through the logits processors, as log-probabilities."""
    for process in processors:
        logits = process(history, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (1, V)


class DraftModel:
    """A small model proposing tokens by sampling from its own distribution. Its cache holds the
    first `seen` tokens of the text; `propose` feeds it whatever came after (the tokens the
    target accepted since) and `sync` drops the drafts the target rejected."""

    def __init__(self, model: LanguageModel, prefill_chunk: int):
        self.model, self.prefill_chunk = model, prefill_chunk
        self.cache: list[Cache] = model.make_cache()
        self.seen = 0  # the cache holds ids[:seen] (after a rebuild, only its window of them)

    def propose(
        self,
        ids: Sequence[int],
        k: int,
        sampler: Sampler,
        distribution: Distribution | None,
        history: mx.array,
        processors: Sequence[LogitsProcessor],
        key: mx.array,
    ) -> tuple[mx.array, mx.array | None]:
        """k draft tokens (k,) after `ids`, lazily, and the (k, V) distributions they were drawn from
        (None when `distribution` is: a greedy target needs only the tokens)."""
        pending = mx.array(list(ids[self.seen :]), mx.uint32)  # (P,) tokens the draft has not seen
        # A long backlog (the prompt, or a rebuilt cache's window) is prefilled in chunks; the few
        # tokens accepted since the last round go into the first draft forward.
        tokens = prefill(self.model, pending, self.cache, self.prefill_chunk) if pending.size > 8 else pending
        drafts, dists = [], []
        for i in range(k):
            logits = self.model(tokens[None], cache=self.cache)[:, -1, :]  # (1, V)
            logprobs = processed(logits, history, processors)  # (1, V)
            key, subkey = mx.random.split(key)
            tokens = sampler(logprobs, subkey).astype(mx.uint32)  # (1,)
            drafts.append(tokens)
            if distribution is not None:
                dists.append(distribution(logprobs))
            if processors and i + 1 < k:
                history = mx.concatenate([history, tokens.astype(history.dtype)])  # (T + 1,)
        # The last draft was never fed: the cache holds ids and the first k - 1 drafts.
        self.seen = len(ids) + k - 1
        return mx.concatenate(drafts), mx.concatenate(dists) if dists else None

    def sync(self, valid: int) -> None:
        """Keep the first `valid` tokens of the text (those the target accepted). A sliding-window
        cache whose ring has overwritten what trimming needs is rebuilt from its window: the draft
        only proposes, so that costs speed, never correctness."""
        extra = self.seen - valid
        if extra <= 0:
            return
        if all(c.trim(extra) == extra for c in self.cache):
            self.seen = valid
            return
        window = self.cache[0].max_size or valid
        self.cache = self.model.make_cache()
        self.seen = max(0, valid - window)


def speculative_steps(
    model: LanguageModel,
    cache: list[Cache],
    ids: list[int],
    *,
    sampler: Sampler,
    processors: Sequence[LogitsProcessor],
    history: mx.array,
    key: mx.array,
    max_tokens: int | None,
    num_draft_tokens: int,
    draft: DraftModel | None,
    prompt_lookup: int | None,
    stats: DraftStats,
) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token, logprobs (V,))` like generate_step's decode loop. `cache` holds all of `ids`
    (prompt and earlier text) but the last; `ids` is extended in place with each round's tokens.
    Prompt lookup is tried first, then the draft model; a round with neither is a plain step."""
    greedy_target = sampler is greedy
    distribution = None if greedy_target else sampler_distribution(sampler)
    if distribution is None and not greedy_target:
        raise OptionError(
            "speculative decoding needs a sampler made by make_sampler (a custom sampler's distribution is unknown)"
        )
    vocab = model.args.vocab_size
    produced = 0
    while max_tokens is None or produced < max_tokens:
        # A round yields up to K + 1 tokens: never draft past max_tokens.
        room = num_draft_tokens if max_tokens is None else min(num_draft_tokens, max_tokens - produced - 1)
        key, draft_key, accept_key = mx.random.split(key, 3)
        proposal = lookup(ids, prompt_lookup, room) if prompt_lookup else []
        q = None
        from_draft = False
        if proposal:
            drafts = mx.array(proposal, mx.uint32)  # (K,)
            q = None if greedy_target else one_hot(drafts, vocab)  # (K, V)
        elif draft is not None and room > 0:
            drafts, q = draft.propose(ids, room, sampler, distribution, history, processors, draft_key)
            from_draft = True
        else:
            drafts = mx.zeros((0,), mx.uint32)
        K = drafts.size

        tokens = mx.concatenate([mx.array(ids[-1:], mx.uint32), drafts])  # (K + 1,)
        logits = model(tokens[None], cache=cache)[0]  # (K + 1, V)
        if processors:  # position i continues the text plus d1..di: each sees its own history
            rows, seen = [], history
            for i in range(K + 1):
                rows.append(processed(logits[i : i + 1], seen, processors))
                seen = mx.concatenate([seen, drafts[i : i + 1].astype(seen.dtype)])  # (T + i + 1,)
            logprobs = mx.concatenate(rows)  # (K + 1, V)
        else:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (K + 1, V)
        if K == 0:
            accepted, token = mx.array(0), sampler(logprobs, accept_key)[0]
        elif greedy_target:
            accepted, token = accept_greedy(mx.argmax(logprobs, axis=-1), drafts)
        else:
            accepted, token = accept_drafts(distribution(logprobs), q, drafts, accept_key)
        mx.eval(accepted, token, logprobs)
        n, last = int(accepted.item()), int(token.item())

        for c in cache:
            if c.trim(K - n) != K - n:
                raise RuntimeError(f"the target cache could not take back {K - n} rejected draft tokens")
        new = [*drafts[:n].tolist(), last]
        if from_draft:
            draft.sync(len(ids) + min(n, K - 1))
        ids.extend(new)
        if processors:
            history = mx.concatenate([history, mx.array(new, history.dtype)])  # (T + n + 1,)
        stats.drafted += K
        stats.accepted += n
        for i, t in enumerate(new):
            produced += 1
            try:
                yield t, logprobs[i]
            except GeneratorExit:
                # The caller stopped inside a round (EOS, a stop string): forget the accepted drafts
                # after the tokens it took, so the cache holds what was yielded, as plain decoding leaves it.
                if n > i + 1:
                    for c in cache:
                        c.trim(n - (i + 1))
                raise
