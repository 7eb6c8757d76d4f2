"""Continuous batching: every sequence in a batch gets the tokens it gets alone (float32 models),
whatever joins, leaves or shares the batch with it."""

import mlx.core as mx
import numpy as np
import pytest
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

from mlx_mixtral import batch_generate, load, stream_batch_generate, stream_generate
from mlx_mixtral.batching.cache import BatchKVCache
from mlx_mixtral.batching.scheduler import BatchGenerator
from mlx_mixtral.cache import KVCache, RotatingKVCache
from mlx_mixtral.errors import ContextLimitError, OptionError
from mlx_mixtral.model import attention_mask
from mlx_mixtral.prefix_cache import PrefixCache
from mlx_mixtral.server.worker import LocalEngine

VOCAB = 32000  # the real Mistral v1 tokenizer, so text, stop strings and EOS are real


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("batch_full"), vocab_size=VOCAB, seed=5)
    return load(add_tokenizer(path))


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """The model's own sliding window (6) is shorter than every sequence here."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("batch_win"), vocab_size=VOCAB, seed=6, sliding_window=6)
    return load(add_tokenizer(path))


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, n)] for n in lengths]


def _alone(model, tokenizer, prompt, max_kv_size=None, **options):
    cache = model.make_cache(max_kv_size)
    return [r.token for r in stream_generate(model, tokenizer, prompt, cache=cache, **options)]


def _batched(model, tokenizer, prompts, **options):
    out = [[] for _ in prompts]
    for i, response in stream_batch_generate(model, tokenizer, prompts, **options):
        out[i].append(response.token)
    return out


def _run(generator, adds_at, steps_cap=500):
    """Step `generator`, adding `(prompt, options)` pairs at the steps `adds_at` names; tokens per uid."""
    tokens, uids, step = {}, [], 0
    while step < steps_cap and (generator.busy or any(s >= step for s in adds_at)):
        for prompt, options in adds_at.get(step, []):
            uids.append(generator.add(prompt, **options))
        for event in generator.step():
            assert event.error is None, event.error
            if event.response is not None:
                tokens.setdefault(event.uid, []).append(event.response.token)
        step += 1
    return [tokens.get(u, []) for u in uids]


@pytest.mark.parametrize("chunk", [4, 512])
def test_greedy_tokens_in_a_batch_equal_each_request_alone(full, chunk):
    model, tokenizer = full
    prompts = _prompts([5, 23, 1, 40, 9, 2, 31])
    alone = [_alone(model, tokenizer, p, max_tokens=24) for p in prompts]
    assert len({tuple(a) for a in alone}) == len(alone)  # distinct answers: rows cannot be swapped unnoticed
    assert _batched(model, tokenizer, prompts, max_tokens=24, max_batch=4, prefill_chunk=chunk) == alone


def test_requests_that_join_mid_stream_and_leave_early(full):
    """Rows of very different lengths join while others decode and leave at different steps."""
    model, tokenizer = full
    prompts = _prompts([7, 30, 3, 12, 50], seed=1)
    lengths = [30, 5, 18, 1, 12]
    alone = [_alone(model, tokenizer, p, max_tokens=n) for p, n in zip(prompts, lengths)]
    generator = BatchGenerator(model, tokenizer, max_batch=3, prefill_chunk=8)
    adds = {0: [(prompts[0], {"max_tokens": lengths[0]})], 3: [(prompts[1], {"max_tokens": lengths[1]})]}
    adds[4] = [(p, {"max_tokens": n}) for p, n in zip(prompts[2:], lengths[2:])]
    assert _run(generator, adds) == alone


@pytest.mark.parametrize("max_kv_size", [None, 9])
def test_sliding_window_shorter_than_the_sequences(windowed, max_kv_size):
    model, tokenizer = windowed
    prompts = _prompts([15, 4, 27, 1], seed=2)
    alone = [_alone(model, tokenizer, p, max_kv_size, max_tokens=40) for p in prompts]
    got = _batched(model, tokenizer, prompts, max_tokens=40, max_batch=4, prefill_chunk=5, max_kv_size=max_kv_size)
    assert got == alone


def test_user_window_on_a_full_attention_model(full):
    """max_kv_size bounds the batch's buffer too: past GROW_STEP slots old keys are dropped."""
    model, tokenizer = full
    prompts = _prompts([20, 3], seed=3)
    alone = [_alone(model, tokenizer, p, 16, max_tokens=300) for p in prompts]
    generator = BatchGenerator(model, tokenizer, max_batch=2, max_kv_size=16)
    got = _run(generator, {0: [(p, {"max_tokens": 300}) for p in prompts]})
    assert got == alone
    assert generator._cache == []  # everyone left: nothing is held


def test_seeded_sampling_draws_the_same_tokens_whatever_its_companions(full):
    model, tokenizer = full
    prompt = _prompts([11], seed=4)[0]
    options = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20)
    alone = _alone(model, tokenizer, prompt, **options)
    others = _prompts([3, 25, 8], seed=5)
    opts = [{"temperature": 0.7, "max_tokens": 30}, {"max_tokens": 4}, {"temperature": 1.3, "max_tokens": 12}]
    got = _batched(model, tokenizer, [others[0], prompt, *others[1:]], options=[opts[0], options, *opts[1:]])
    assert got[1] == alone
    assert got[0] != alone  # the companions sampled too


def test_each_sequence_keeps_its_own_options(full):
    """Stop strings, logprobs, logit bias, repetition penalty and max_tokens per row, as alone."""
    model, tokenizer = full
    prompts = _prompts([6, 14, 9, 20], seed=6)
    first = tokenizer.decode(_alone(model, tokenizer, prompts[0], max_tokens=8)[3:5])
    per = [
        {"stop": [first] if first.strip() else None, "max_tokens": 30},
        {"logprobs": 3, "max_tokens": 10},
        {"logit_bias": {100: 5.0, 200: -100.0}, "max_tokens": 16},
        {"repetition_penalty": 1.5, "max_tokens": 16},
    ]
    ref = [list(stream_generate(model, tokenizer, p, **o)) for p, o in zip(prompts, per)]
    got = [[] for _ in prompts]
    for i, response in stream_batch_generate(model, tokenizer, prompts, options=per, max_batch=4):
        got[i].append(response)
    for want, have in zip(ref, got):
        assert [r.token for r in have] == [r.token for r in want]
        assert "".join(r.text for r in have) == "".join(r.text for r in want)
        assert have[-1].finish_reason == want[-1].finish_reason
        for a, b in zip(have, want):
            assert (a.logprob is None) == (b.logprob is None)
            if a.logprob is not None:
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_cancelling_one_stream_leaves_the_others_unchanged(full):
    model, tokenizer = full
    prompts = _prompts([8, 19, 5], seed=7)
    alone = [_alone(model, tokenizer, p, max_tokens=25) for p in prompts]
    generator = BatchGenerator(model, tokenizer, max_batch=3)
    uids = [generator.add(p, max_tokens=25) for p in prompts]
    tokens = {u: [] for u in uids}
    done, step = set(), 0
    while generator.busy:
        if step == 6:
            generator.cancel(uids[1])
        for event in generator.step():
            if event.response is not None:
                tokens[event.uid].append(event.response.token)
            if event.done:
                done.add(event.uid)
        step += 1
        if uids[1] not in done:
            assert step < 9  # it left within a step or two of the cancel
    assert tokens[uids[0]] == alone[0] and tokens[uids[2]] == alone[2]
    assert tokens[uids[1]] == alone[1][: len(tokens[uids[1]])] and len(tokens[uids[1]]) < 25
    assert done == set(uids)


def test_prefix_cache_hands_rows_their_prefix_and_takes_them_back(full):
    """The server's prefix cache: a turn that continues an earlier conversation starts from its
    cache, and every sequence's cache goes back in when it leaves."""
    model, tokenizer = full
    base = _prompts([30], seed=8)[0]
    prefixes = PrefixCache(lambda: model.make_cache(), capacity=4)
    generator = BatchGenerator(model, tokenizer, max_batch=4, take_cache=prefixes.take, put_cache=prefixes.put)
    first = _run(generator, {0: [(base, {"max_tokens": 6}), (base[:12], {"max_tokens": 6})]})
    assert len(prefixes) == 2
    follow_ups = [base + first[0] + [100, 200, 300], base[:12] + [7, 8], base[:20] + [9]]
    alone = [_alone(model, tokenizer, p, max_tokens=10) for p in follow_ups]
    taken = []
    generator.take_cache = lambda ids: taken.append(prefixes.take(ids)) or taken[-1]
    assert _run(generator, {0: [(p, {"max_tokens": 10}) for p in follow_ups]}) == alone
    # what each found cached: the third cannot share the first's entry, which is in use by the first
    assert [kept for _, kept in taken] == [len(base) + 6, 12, 12]
    assert len(prefixes) == 4  # all three went back in (the first superseding its old entry)


def test_quantized_kv_cache_rows_equal_alone(tmp_path):
    path = add_tokenizer(
        make_hf_checkpoint(tmp_path / "q", vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, seed=9)
    )
    model, tokenizer = load(path, kv_bits=8, kv_group_size=32)
    prompts = _prompts([9, 21, 2], seed=10)
    alone = [_alone(model, tokenizer, p, max_tokens=16) for p in prompts]
    assert _batched(model, tokenizer, prompts, max_tokens=16) == alone


def test_batch_generate_returns_texts_in_prompt_order(full):
    model, tokenizer = full
    prompts = ["The cat sat on the", "Once upon a time", "1, 2, 3,"]
    texts = batch_generate(model, tokenizer, prompts, max_tokens=12, max_batch=2)
    assert texts == ["".join(r.text for r in stream_generate(model, tokenizer, p, max_tokens=12)) for p in prompts]


def test_bad_requests_fail_alone_and_before_any_work(full):
    model, tokenizer = full
    generator = BatchGenerator(model, tokenizer, max_batch=2)
    good = generator.add(_prompts([5])[0], max_tokens=5)
    with pytest.raises(OptionError, match="outside the vocabulary"):
        generator.add([1, VOCAB + 5])
    with pytest.raises(OptionError, match="temperature"):
        generator.add([1, 2], temperature=-1)
    with pytest.raises(ContextLimitError):
        generator.add([1] * model.args.max_position_embeddings)
    assert _run(generator, {}) == [] and not generator.busy  # the good one ran to its end
    with pytest.raises(OptionError, match="max_batch"):
        BatchGenerator(model, tokenizer, max_batch=0)
    with pytest.raises(OptionError, match="2 option dicts for 3 prompts"):
        batch_generate(model, tokenizer, ["a", "b", "c"], options=[{}, {}])
    del good


def test_speculative_and_unknown_options_are_refused_by_name(full):
    """A batch takes generation_options' dict (speculation off) but refuses to speculate, and a
    misspelt option is named, not a TypeError from deep inside."""
    model, tokenizer = full
    generator = BatchGenerator(model, tokenizer, max_batch=2)
    prompt = _prompts([6])[0]
    uid = generator.add(prompt, max_tokens=6, num_draft_tokens=3, prompt_lookup=None, draft_model=None)
    for options, name in ((dict(prompt_lookup=2), "prompt_lookup"), (dict(draft_model=model), "draft_model")):
        with pytest.raises(OptionError, match=f"^{name} is a stream_generate option for one sequence") as e:
            generator.add(prompt, **options)
        assert e.value.option == name
    with pytest.raises(OptionError, match="unknown option 'temprature'; expected one of .*temperature"):
        generator.add(prompt, temprature=0.5)
    got = []
    while generator.busy:
        got += [e.response.token for e in generator.step() if e.uid == uid and e.response is not None]
    assert got == [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=6)]
    with pytest.raises(OptionError, match="speculative decoding serves one request at a time"):
        LocalEngine(model, tokenizer, max_batch=2, speculative={"prompt_lookup": 2})


def test_max_tokens_zero_and_one_token_prompts(full):
    model, tokenizer = full
    got = _batched(model, tokenizer, [[1], [1, 2, 3], [5]], options=[{"max_tokens": 0}, {}, {"max_tokens": 3}])
    assert got[0] == [] and got[2] == _alone(model, tokenizer, [5], max_tokens=3)


# The cache on its own, against one-sequence caches.


def _kv(rng, n, heads=2, dim=8):
    return mx.array(rng.standard_normal((1, heads, n, dim)).astype(np.float32))


def test_batch_cache_rows_round_trip_and_masks_hide_the_padding():
    rng = np.random.default_rng(0)
    rows = []
    for n in (3, 7, 1):
        layer = KVCache()
        layer.update_and_fetch(_kv(rng, n), _kv(rng, n))
        rows.append(layer)
    batch = BatchKVCache()
    for layer in rows:
        batch.extend(layer)
    assert batch.left == [4, 0, 6] and batch.positions == [3, 7, 1] and batch.offset == 7
    for i, layer in enumerate(rows):
        back = batch.row(i)
        assert back.offset == layer.offset
        np.testing.assert_array_equal(np.array(back.state[0]), np.array(layer.state[0]))
    batch.update_and_fetch(mx.repeat(_kv(rng, 1), 3, 0), mx.repeat(_kv(rng, 1), 3, 0))
    mask = np.array(batch.mask(attention_mask(7, 1, 8, None), 1))  # (B, 1, 1, S)
    assert mask.shape == (3, 1, 1, 8)
    assert [int(m.sum()) for m in mask[:, 0, 0]] == [4, 8, 2]
    batch.keep([2, 0])  # the longest row left: common padding goes
    assert batch.left == [2, 0] and batch.offset == 4 and batch.positions == [2, 4]


def test_batch_cache_with_a_window_drops_only_unseen_slots():
    rng = np.random.default_rng(1)
    ring = RotatingKVCache(5)
    batch = BatchKVCache(5)
    batch.extend(RotatingKVCache(5))  # an empty row: a one-token prompt's
    for _ in range(300):
        k, v = _kv(rng, 1), _kv(rng, 1)
        ring.update_and_fetch(k, v)
        batch.update_and_fetch(k, v)
    assert batch.offset <= 5 - 1 + 256  # bounded
    np.testing.assert_array_equal(np.array(batch.state[0][..., -5:, :]), np.array(ring.state[0]))
    assert batch.row(0).offset == 300


class _CountingChunks:
    """The model, counting the prefill chunks (forwards over more than one token) it runs."""

    def __init__(self, model):
        self.model, self.chunks = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, cache=None):
        self.chunks += tokens.shape[1] > 1
        return self.model(tokens, cache=cache)


@pytest.mark.parametrize("short_length", [5, 1])  # 1: nothing to prefill, it joins at once
def test_a_short_prompt_behind_a_long_one_waits_one_chunk(full, short_length):
    """The shortest starting prompt prefills first, and no chunk of the long prompt runs before the
    short one's first token is returned: it comes a step or two in, not after the long one's 25
    chunks; both still get their own tokens."""
    model, tokenizer = full
    long, short = _prompts([200, short_length], seed=11)
    alone = [_alone(model, tokenizer, p, max_tokens=6) for p in (long, short)]
    generator = BatchGenerator(model, tokenizer, max_batch=4, prefill_chunk=8)
    counting = generator.model = _CountingChunks(model)
    uids = [generator.add(long, max_tokens=6), generator.add(short, max_tokens=6)]
    first_at, chunks_before, tokens, step = {}, {}, {u: [] for u in uids}, 0
    while generator.busy:
        for event in generator.step():
            if event.response is not None:
                first_at.setdefault(event.uid, step)
                chunks_before.setdefault(event.uid, counting.chunks)
                tokens[event.uid].append(event.response.token)
        step += 1
    assert first_at[uids[1]] <= 3 and first_at[uids[0]] >= 24
    assert chunks_before[uids[1]] == (short_length > 1)  # its own chunk only
    assert [tokens[u] for u in uids] == alone
