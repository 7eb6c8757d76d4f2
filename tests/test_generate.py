"""The generation loop against transformers' generate on the same tiny checkpoint."""

import json
import random
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers.memorized import TEXT_CONTINUATION, TEXT_PROMPT, memorized_4bit
from helpers.tiny_models import add_tokenizer, load_hf_model, make_hf_checkpoint

from mlx_mixtral import generate, load, load_model, stream_generate
from mlx_mixtral.generate import StopMatcher, generate_step
from mlx_mixtral.sampling import make_logits_processors, make_sampler

PROMPT = [1, 5, 17, 99, 3, 42, 7, 8, 9, 10, 11, 64, 23]


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    hf = load_hf_model(tiny_hf_dir)
    hf.generation_config.eos_token_id = None  # run the full length: random weights emit id 2 at times
    return hf, load_model(tiny_hf_dir)


def _hf_generate(hf, prompt, n, **kwargs):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.stack(out.scores)[:, 0].double()


@pytest.mark.parametrize("chunk", [3, 512])
def test_greedy_equals_transformers(models, chunk):
    """48 greedy tokens, with the prompt prefilled in one piece and in chunks of 3."""
    hf, model = models
    ref, _ = _hf_generate(hf, PROMPT, 48)
    ours = [t for t, _ in generate_step(PROMPT, model, max_tokens=48, prefill_chunk=chunk)]
    assert ours == ref


def test_logprobs_equal_transformers_scores(models):
    hf, model = models
    ref_tokens, scores = _hf_generate(hf, PROMPT, 12)
    ref = torch.log_softmax(scores, dim=-1).numpy()
    ours = np.stack([np.array(lp) for _, lp in generate_step(PROMPT, model, max_tokens=12)])
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_repetition_penalty_equals_transformers(models):
    """transformers penalizes every earlier token (prompt included): context_size=None here."""
    hf, model = models
    ref, _ = _hf_generate(hf, PROMPT, 32, repetition_penalty=1.8)
    plain, _ = _hf_generate(hf, PROMPT, 32)
    assert ref != plain  # the penalty changes this output, so the comparison means something
    processors = make_logits_processors(repetition_penalty=1.8, repetition_context_size=None)
    ours = [t for t, _ in generate_step(PROMPT, model, max_tokens=32, logits_processors=processors)]
    assert ours == ref


def test_seeded_sampling_is_repeatable(models):
    _, model = models
    sampler = make_sampler(1.5, top_p=0.95)

    def run(seed):
        return [t for t, _ in generate_step(PROMPT, model, max_tokens=24, sampler=sampler, key=mx.random.key(seed))]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_k_one_sampling_is_greedy(models):
    _, model = models
    greedy = [t for t, _ in generate_step(PROMPT, model, max_tokens=16)]
    sampled = [t for t, _ in generate_step(PROMPT, model, max_tokens=16, sampler=make_sampler(2.0, top_k=1))]
    assert sampled == greedy


def test_max_tokens_is_exact(models):
    _, model = models
    assert len(list(generate_step(PROMPT, model, max_tokens=7))) == 7
    assert list(generate_step(PROMPT, model, max_tokens=0)) == []


def test_stopping_early_leaves_a_cache_that_continues_correctly(models):
    """Break after 10 tokens: the cache holds the prompt and a prefix of what was yielded, and
    continuing from it gives transformers' greedy continuation of the whole sequence."""
    hf, model = models
    ref, _ = _hf_generate(hf, PROMPT, 22)
    cache = model.make_cache()
    first = []
    for token, _ in generate_step(PROMPT, model, cache=cache, max_tokens=100):
        first.append(token)
        if len(first) == 10:
            break
    seen = PROMPT + first
    assert len(PROMPT) + 9 <= cache[0].offset <= len(seen)
    if cache[0].offset == len(seen):  # the last token's logits are needed again: recompute it
        for layer in cache:
            layer.trim(1)
    rest = [t for t, _ in generate_step(seen[cache[0].offset :], model, cache=cache, max_tokens=12)]
    assert first + rest == ref


@pytest.mark.parametrize("bad", [[], [[1, 2]]])
def test_bad_prompt_is_refused(models, bad):
    _, model = models
    with pytest.raises(ValueError, match="prompt"):
        next(generate_step(mx.array(bad, mx.uint32) if bad else bad, model))


def test_stop_matcher_never_leaks_a_stop_string_however_it_is_split():
    """Random texts cut at random points: the emitted text is the text before the first stop
    string, and no chunk ever contains a stop string or anything after it."""
    rng = random.Random(0)
    alphabet = "ab</>\n é"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[: min(hits)] if hits else text
        matcher, out, stopped = StopMatcher(stops), "", False
        for piece in pieces:
            emitted, stopped = matcher.feed(piece)
            out += emitted
            if stopped:
                break
        if not stopped:
            out += matcher.flush()
        assert out == expected, (text, stops, pieces)
        assert stopped == bool(hits)


def test_each_step_draws_with_a_fresh_key(models):
    """A sampler that ignores the logits shows the keys: one key reused would repeat one token."""
    _, model = models

    def uniform(logprobs, key=None):
        return mx.random.randint(0, logprobs.shape[-1], (logprobs.shape[0],), key=key)

    tokens = [t for t, _ in generate_step(PROMPT, model, max_tokens=20, sampler=uniform, key=mx.random.key(0))]
    assert len(set(tokens)) > 5


# --- text: the real Mixtral tokenizer -------------------------------------------------------------
@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    return memorized_4bit(tmp_path_factory)


@pytest.fixture(scope="module")
def babbler(tmp_path_factory):
    """Random weights, real tokenizer: emits byte-fallback pieces, CJK, stray spaces."""
    return load(add_tokenizer(make_hf_checkpoint(tmp_path_factory.mktemp("babbler"), vocab_size=32000, seed=7)))


def test_streamed_text_joins_to_the_decoded_tokens(babbler):
    model, tok = babbler
    rs = list(stream_generate(model, tok, "Once upon a time", max_tokens=200, temperature=1.0, seed=1))
    tokens = [r.token for r in rs if r.token not in tok.eos_token_ids]
    assert "".join(r.text for r in rs) == tok.decode(tokens)
    assert any(tok.id_to_token(t).startswith("<0x") for t in tokens)  # byte pieces were streamed too
    assert [r.generation_tokens for r in rs] == list(range(1, len(rs) + 1))
    assert all(r.prompt_tokens == len(tok.encode("Once upon a time")) for r in rs)


@pytest.mark.parametrize("stop", [" sat on the l", "t on t", "dog", "g, w", "tree."])
def test_stop_strings_split_across_tokens_are_never_emitted(memorized, stop):
    model, tok = load(memorized)
    full = generate(model, tok, TEXT_PROMPT, max_tokens=15)
    assert full == TEXT_CONTINUATION and stop in full  # the continuation keeps its leading space
    rs = list(stream_generate(model, tok, TEXT_PROMPT, max_tokens=15, stop=["never appears", stop]))
    assert "".join(r.text for r in rs) == full[: full.index(stop)]
    assert rs[-1].finish_reason == "stop" and all(r.finish_reason is None for r in rs[:-1])


def test_every_eos_id_of_generation_config_stops(memorized, tmp_path):
    """generation_config.json may list several end ids; '.' made one of them ends the text there."""
    model_dir = tmp_path / "m"
    shutil.copytree(memorized, model_dir)
    model, tok = load(model_dir)
    period = tok.encode("tree.", add_special_tokens=False)[-1]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, period]}))
    model, tok = load(model_dir)
    assert tok.eos_token_ids == {2, period}
    rs = list(stream_generate(model, tok, TEXT_PROMPT, max_tokens=30))
    assert "".join(r.text for r in rs) == " the dog sat on the log, while the bird sang in the tree"
    assert rs[-1].token == period and rs[-1].finish_reason == "stop"


def test_length_finish_and_logprobs_fields(memorized):
    model, tok = load(memorized)
    rs = list(stream_generate(model, tok, TEXT_PROMPT, max_tokens=4, logprobs=3))
    assert [r.finish_reason for r in rs] == [None, None, None, "length"]
    for r in rs:
        assert r.top_logprobs[0][0] == r.token  # greedy picks the most likely token
        assert r.logprob == pytest.approx(r.top_logprobs[0][1])
        assert r.top_logprobs[0][1] >= r.top_logprobs[1][1] >= r.top_logprobs[2][1]
        assert r.peak_memory > 0 and r.prompt_tps > 0
