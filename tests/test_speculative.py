"""Speculative decoding against plain decoding: the same greedy tokens, the same sampling distribution.

The models are tiny random float32 Mixtrals built in MLX (no checkpoint files), so the file runs in
seconds; the acceptance rule is checked by chi-square tests against the exact target distribution,
and each test also shows that a deliberately wrong rule fails it.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from helpers.tiny_models import TINY_MIXTRAL, add_tokenizer

from mlx_mixtral import speculative, stream_generate
from mlx_mixtral.batching.scheduler import DEFAULT_MAX_BATCH
from mlx_mixtral.config import ModelArgs
from mlx_mixtral.errors import OptionError
from mlx_mixtral.generate import generate_step
from mlx_mixtral.model import Mixtral
from mlx_mixtral.options import generation_options
from mlx_mixtral.sampling import make_sampler, sampler_probs
from mlx_mixtral.speculative import DraftStats, accept_drafts, accept_greedy, lookup
from mlx_mixtral.tokenizer.files import load_tokenizer

# A prompt that repeats itself, so prompt lookup finds matches (some drafts are accepted, some not).
BLOCK = [1, 5, 17, 99, 3, 42, 7, 8, 9, 10, 11, 64, 23, 31]
REPEATING = BLOCK * 3 + BLOCK[:5]


def tiny(seed: int, head_scale: float = 1.0, **overrides) -> Mixtral:
    """A random tiny Mixtral; `head_scale` sharpens its output distribution (random weights give
    nearly uniform ones, too alike for a test to tell a draft's distribution from the target's)."""
    mx.random.seed(seed)
    model = Mixtral(ModelArgs.from_dict({"model_type": "mixtral", **TINY_MIXTRAL, **overrides}))
    if head_scale != 1.0:
        model.lm_head.weight = model.lm_head.weight * head_scale
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def target():
    return tiny(0)


@pytest.fixture(scope="module")
def draft():
    return tiny(1, num_hidden_layers=1)


def run(model, prompt, n, **kwargs):
    """The n tokens generate_step yields (plain without draft options, speculative with them)."""
    return [t for t, _ in generate_step(prompt, model, max_tokens=n, **kwargs)]


# --- greedy: exactly the plain tokens -----------------------------------------------------------


def test_greedy_prompt_lookup_equals_run(target):
    stats = DraftStats()
    ours = run(target, REPEATING, 48, prompt_lookup=2, draft_stats=stats)
    assert ours == run(target, REPEATING, 48)
    assert 0 < stats.accepted < stats.drafted  # drafts were both accepted and rejected


def test_greedy_draft_model_equals_run(target, draft):
    stats = DraftStats()
    assert run(target, REPEATING, 40, draft_model=draft, num_draft_tokens=4, draft_stats=stats) == run(
        target, REPEATING, 40
    )
    assert stats.drafted > 0 and stats.accepted <= stats.drafted
    # The target as its own draft: every draft is accepted, rounds of K + 1 tokens.
    stats = DraftStats()
    assert run(target, REPEATING, 20, draft_model=target, draft_stats=stats) == run(target, REPEATING, 20)
    assert stats.accepted == stats.drafted > 0


def test_greedy_chunked_prefill_and_sliding_window(target, draft):
    """Prefill in chunks of 5 and a sliding window of 16 tokens, shorter than the 45-token prompt
    and the 40 generated: the rotating cache takes back rejected drafts past its window."""
    reference = run(target, REPEATING, 40, cache=target.make_cache(max_kv_size=16), prefill_chunk=5)
    assert reference != run(target, REPEATING, 40)  # the window changes the answer: it is in effect
    for options in (dict(prompt_lookup=1), dict(draft_model=draft), dict(prompt_lookup=3, draft_model=draft)):
        stats = DraftStats()
        cache = target.make_cache(max_kv_size=16)
        ours = run(target, REPEATING, 40, cache=cache, prefill_chunk=5, draft_stats=stats, **options)
        assert ours == reference, options
        assert stats.drafted > stats.accepted  # rejections happened, so the caches were trimmed
        assert cache[0].offset == len(REPEATING) + 40 - 1  # every token but the last went through


def test_sliding_window_draft_is_rebuilt_not_wrong(target):
    """A draft with its own sliding window cannot always trim its ring; it re-reads its window."""
    windowed = tiny(2, num_hidden_layers=1, sliding_window=8)
    ours = run(target, REPEATING, 30, draft_model=windowed, num_draft_tokens=4)
    assert ours == run(target, REPEATING, 30)


def test_logits_processors_see_each_positions_history(target):
    """A repetition penalty depends on the tokens before each verified position."""
    from mlx_mixtral.sampling import make_logits_processors

    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=8)
    reference = run(target, REPEATING, 32, logits_processors=processors)
    assert reference != run(target, REPEATING, 32)
    assert run(target, REPEATING, 32, logits_processors=processors, prompt_lookup=2) == reference


def test_max_tokens_is_exact(target, draft):
    for n in range(1, 9):
        assert len(run(target, REPEATING, n, prompt_lookup=1, num_draft_tokens=5)) == n
        assert len(run(target, REPEATING, n, draft_model=draft, num_draft_tokens=5)) == n
    assert run(target, REPEATING, 0, prompt_lookup=1) == []


def test_stopping_inside_a_round_leaves_the_cache_as_plain_decoding_does(target):
    """A caller that stops after j tokens (EOS, a stop string) finds the cache holding the prompt
    and those tokens but possibly the last, not the accepted drafts it never took."""
    for j in range(1, 8):  # the target as its own draft: rounds of 4 accepted drafts and a bonus token
        cache = target.make_cache()
        steps = generate_step(REPEATING, target, cache=cache, max_tokens=40, draft_model=target, num_draft_tokens=4)
        fed = REPEATING + [next(steps)[0] for _ in range(j)]
        steps.close()
        held = cache[0].offset
        assert len(fed) - 1 <= held <= len(fed)
        fresh = target.make_cache()
        target(mx.array([fed[:held]]), cache=fresh)
        np.testing.assert_allclose(np.array(cache[0].state[0]), np.array(fresh[0].state[0]), atol=1e-4)


# --- the acceptance rule, statistically ---------------------------------------------------------


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile for df degrees of freedom at the normal quantile z (3.09: 0.999),
    by Wilson and Hilferty's cube-root approximation (within 2% of the exact value for df >= 3)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi_square(observed: np.ndarray, expected_probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting fewer than 5 are pooled."""
    expected = expected_probs * observed.sum()
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


def always_accept(p, q, draft, key):
    """A wrong rule: take every draft, then a bonus token from p_{K+1}."""
    n = mx.full(draft.shape[:-1], draft.shape[-1], mx.int32)
    return n, mx.random.categorical(mx.log(p[..., -1, :]), axis=-1, key=key)


def resample_from_p(p, q, draft, key):
    """A wrong rule: the right acceptance test, but a rejection redraws from p_i, not max(0, p_i - q_i)."""
    n, _ = accept_drafts(p, q, draft, key)
    rows = mx.take_along_axis(p, n[..., None, None], axis=-2)[..., 0, :]
    return n, mx.random.categorical(mx.log(rows), axis=-1, key=mx.random.split(key)[1])


P = np.array(
    [[0.40, 0.25, 0.20, 0.10, 0.05], [0.05, 0.15, 0.50, 0.20, 0.10], [0.30, 0.05, 0.05, 0.30, 0.30]], np.float32
)
Q = np.array([[0.10, 0.40, 0.20, 0.25, 0.05], [0.30, 0.20, 0.20, 0.25, 0.05]], np.float32)


def emitted_positions(rule, draws: int = 30000, seed: int = 7) -> list[np.ndarray]:
    """Run `rule` on `draws` rounds of K=2 drafts drawn from Q; the tokens emitted at positions 0,
    1 and 2 (a position is emitted only where every earlier draft was accepted)."""
    key_q, key_rule = mx.random.split(mx.random.key(seed))
    p = mx.broadcast_to(mx.array(P), (draws, *P.shape))
    q = mx.broadcast_to(mx.array(Q), (draws, *Q.shape))
    drafts = mx.random.categorical(mx.log(q), axis=-1, key=key_q)  # (draws, 2)
    n, token = rule(p, q, drafts, key_rule)
    n, token, drafts = np.array(n), np.array(token), np.array(drafts)
    out = []
    for i in range(3):
        reached = n >= i
        tokens = np.where(n[reached] == i, token[reached], drafts[reached, min(i, 1)])
        out.append(tokens)
    return out


def position_statistics(rule) -> list[tuple[float, float]]:
    stats = []
    for i, tokens in enumerate(emitted_positions(rule)):
        stat, df = chi_square(np.bincount(tokens, minlength=5).astype(np.float64), P[i].astype(np.float64))
        stats.append((stat, chi_square_critical(df)))
    return stats


def test_acceptance_rule_matches_the_target_distribution():
    """Each emitted position has the target's distribution p_i (30k rounds, chi-square, df 4)."""
    for stat, critical in position_statistics(accept_drafts):
        assert stat < critical


@pytest.mark.parametrize("wrong", [always_accept, resample_from_p])
def test_wrong_acceptance_rules_fail_the_same_test(wrong):
    assert any(stat > critical for stat, critical in position_statistics(wrong))


def test_greedy_rule():
    target = mx.array([[4, 2, 9, 1], [4, 3, 9, 1], [5, 2, 9, 7]])
    draft = mx.array([[4, 2, 9], [4, 2, 9], [4, 2, 9]])
    n, token = accept_greedy(target, draft)
    assert n.tolist() == [3, 1, 0] and token.tolist() == [1, 3, 5]


def test_prompt_lookup_proposals():
    ids = [1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    assert lookup(ids, 2, 3) == [4, 5, 1]  # the most recent earlier "1 2", not the first one
    assert lookup(ids, 3, 3) == []  # "5 1 2" never occurred before
    assert lookup([7, 7], 1, 4) == [7]  # stops where the text does
    assert lookup(ids, 2, 0) == []


# --- end to end: sampled tokens have plain sampling's distribution ------------------------------


def exact_first_two(model, prompt: list[int]) -> np.ndarray:
    """P(t1, t2) of plain temperature-1 sampling, flattened (V * V,), from the model's logits."""
    V = model.args.vocab_size
    first = mx.softmax(model(mx.array([prompt]))[0, -1].astype(mx.float32))  # (V,)
    batch = mx.concatenate([mx.broadcast_to(mx.array(prompt), (V, len(prompt))), mx.arange(V)[:, None]], axis=1)
    second = mx.softmax(model(batch)[:, -1].astype(mx.float32), axis=-1)  # (V, V)
    return np.array(first[:, None] * second, np.float64).reshape(-1)


def sampled_first_two(model, draft, prompt: list[int], runs: int) -> np.ndarray:
    V = model.args.vocab_size
    sampler = make_sampler(1.0)
    counts = np.zeros(V * V)
    for seed in range(runs):
        steps = generate_step(
            prompt, model, sampler=sampler, key=mx.random.key(seed), max_tokens=3, draft_model=draft, num_draft_tokens=2
        )
        t1, t2 = next(steps)[0], next(steps)[0]
        counts[t1 * V + t2] += 1
    return counts


@pytest.fixture(scope="module")
def peaked():
    """A vocabulary of 8 and sharp, different target and draft distributions."""
    return tiny(3, head_scale=12.0, vocab_size=8), tiny(4, head_scale=12.0, vocab_size=8, num_hidden_layers=1)


def test_sampled_tokens_have_the_plain_distribution(peaked):
    model, draft = peaked
    prompt = [1, 5, 3]
    stat, df = chi_square(sampled_first_two(model, draft, prompt, 1500), exact_first_two(model, prompt))
    assert stat < chi_square_critical(df)


def test_sampled_tokens_with_a_wrong_rule_fail(peaked, monkeypatch):
    model, draft = peaked
    prompt = [1, 5, 3]
    monkeypatch.setattr(speculative, "accept_drafts", always_accept)
    stat, df = chi_square(sampled_first_two(model, draft, prompt, 500), exact_first_two(model, prompt))
    assert stat > chi_square_critical(df)


def test_sampler_probs_is_what_the_sampler_draws():
    logprobs = mx.log(mx.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    probs = np.array(sampler_probs(logprobs, 0.7, top_p=0.9, top_k=4, min_p=0.1))[0]
    assert probs[4] == 0 and abs(probs.sum() - 1) < 1e-6
    sampler = make_sampler(0.7, top_p=0.9, top_k=4, min_p=0.1)
    keys = mx.random.split(mx.random.key(0), 20000)
    draws = np.array(mx.concatenate([sampler(logprobs, k) for k in keys[:4000]]))
    stat, df = chi_square(np.bincount(draws, minlength=5)[probs > 0].astype(np.float64), probs[probs > 0])
    assert stat < chi_square_critical(max(df, 3))


# --- options and statistics ---------------------------------------------------------------------


def test_draft_vocab_mismatch_is_one_line(target):
    with pytest.raises(OptionError, match=r"vocab_size 64 differs from the target model's 128") as e:
        run(target, BLOCK, 4, draft_model=tiny(5, vocab_size=64))
    assert "\n" not in str(e.value)


def test_bad_counts_are_refused(target):
    with pytest.raises(OptionError, match="num_draft_tokens must be >= 1"):
        run(target, BLOCK, 4, prompt_lookup=2, num_draft_tokens=0)
    with pytest.raises(OptionError, match="prompt_lookup"):
        generation_options(prompt_lookup=0)
    with pytest.raises(OptionError, match="num_draft_tokens"):
        generation_options(num_draft_tokens=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(add_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_structured_output_refuses_speculation(target, tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with pytest.raises(OptionError, match="json_schema or tools"):
        next(stream_generate(target, tokenizer, BLOCK, json_schema=schema, prompt_lookup=2))
    with pytest.raises(OptionError, match="json_schema or tools"):
        generation_options(json_schema=schema, prompt_lookup=2)


def test_stream_generate_counts_drafts(target, tokenizer):
    responses = list(stream_generate(target, tokenizer, REPEATING, max_tokens=48, prompt_lookup=2))
    assert [r.token for r in responses] == run(target, REPEATING, 48)
    last = responses[-1]
    assert 0 < last.accepted_draft_tokens <= last.draft_tokens
    counts = [(r.draft_tokens, r.accepted_draft_tokens) for r in responses]
    assert counts == sorted(counts)  # running totals
    plain_last = list(stream_generate(target, tokenizer, REPEATING, max_tokens=8))[-1]
    assert plain_last.draft_tokens == plain_last.accepted_draft_tokens == 0


def test_serve_runs_speculation_one_request_at_a_time():
    """--max-batch defaults to 8, or to 1 with a draft source; asking for both is a one-line error."""
    from mlx_mixtral.cli.serve import parse_args

    assert parse_args(["--model", "m"]).max_batch == DEFAULT_MAX_BATCH
    assert parse_args(["--model", "m", "--prompt-lookup", "2"]).max_batch == 1
    assert parse_args(["--model", "m", "--prompt-lookup", "2", "--max-batch", "1"]).max_batch == 1
    with pytest.raises(OptionError, match="^--max-batch 4 with --draft-model/--prompt-lookup: speculative decoding"):
        parse_args(["--model", "m", "--draft-model", "d", "--max-batch", "4"])
