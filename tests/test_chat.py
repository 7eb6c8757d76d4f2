"""ChatSession: cache reuse across turns (counted), trimming, interruption, save/load, context limit."""

import pytest
import torch
from helpers.memorized import TRANSCRIPT, memorized_4bit
from helpers.tiny_models import add_tokenizer, load_hf_model, make_hf_checkpoint

from mlx_mixtral import load
from mlx_mixtral.chat import ChatSession, common_prefix_length
from mlx_mixtral.errors import ContextLimitError
from mlx_mixtral.generate import generate_step


class CountingModel:
    """The model, counting every token position it is asked to run."""

    def __init__(self, model):
        self.model, self.args, self.tokens = model, model.args, 0

    def __call__(self, x, cache=None):
        self.tokens += x.shape[1]
        return self.model(x, cache=cache)

    def make_cache(self, max_kv_size=None):
        return self.model.make_cache(max_kv_size)


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """A 4-bit model that answers the two questions of TRANSCRIPT with its two answers."""
    return load(memorized_4bit(tmp_path_factory))


@pytest.fixture(scope="module")
def babbler(tmp_path_factory):
    """Random weights, real Mixtral tokenizer: answers are byte soup that does not re-encode to
    the ids generated, so the template's history disagrees with the cache."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("babbler"), vocab_size=32000, seed=3)
    add_tokenizer(path)
    model, tokenizer = load(path)
    return model, tokenizer, path


def _from_scratch(model, ids, n):
    return [t for t, _ in generate_step(ids, model, max_tokens=n)]


def test_second_turn_prefills_only_its_own_tokens(memorized):
    model, tokenizer = memorized
    counting = CountingModel(model)
    chat = ChatSession(counting, tokenizer)
    first = "".join(chat.send(TRANSCRIPT[0]["content"], max_tokens=40))
    turn1_prompt = len(tokenizer.apply_chat_template(TRANSCRIPT[:1]))
    assert first == TRANSCRIPT[1]["content"] and chat.last.finish_reason == "stop"
    assert chat.last.prompt_tokens == turn1_prompt

    counting.tokens = 0
    second = "".join(chat.send(TRANSCRIPT[2]["content"], max_tokens=40))
    assert second == TRANSCRIPT[3]["content"]
    history = tokenizer.apply_chat_template(TRANSCRIPT[:2], add_generation_prompt=False)  # ends with </s>
    ids = tokenizer.apply_chat_template(TRANSCRIPT[:3])
    assert ids[: len(history)] == history  # the v1 template extends the previous conversation
    new = len(ids) - len(history)  # "[INST] How many experts does it use? [/INST]"
    assert chat.last.prompt_tokens == new
    decode_steps = chat.cache[0].offset - len(ids)  # tokens fed back while answering
    assert counting.tokens == new + decode_steps  # nothing of turn 1 ran again
    assert chat.messages == TRANSCRIPT


def test_changed_history_trims_the_cache_and_answers_as_from_scratch(memorized):
    """A new system prompt lands in the first user message (v1): the cache is cut back to the
    shared prefix and the answer equals a run over the whole conversation from an empty cache."""
    model, tokenizer = memorized
    chat = ChatSession(model, tokenizer)
    "".join(chat.send(TRANSCRIPT[0]["content"], max_tokens=40))
    before = list(chat.cached_ids)
    chat.system = "Answer briefly."
    tokens = [r.token for r in chat.stream(TRANSCRIPT[2]["content"], max_tokens=12)]
    ids = tokenizer.apply_chat_template(chat.conversation()[:-1])
    assert chat.last.prompt_tokens == len(ids) - common_prefix_length(before, ids) < len(ids)
    assert tokens == _from_scratch(model, ids, len(tokens))


def test_history_that_re_encodes_differently_is_recomputed_exactly(babbler):
    model, tokenizer, _ = babbler
    chat = ChatSession(model, tokenizer)
    list(chat.stream("Hello there", max_tokens=12))
    before = list(chat.cached_ids)
    tokens = [r.token for r in chat.stream("And now?", max_tokens=12)]
    ids = tokenizer.apply_chat_template(chat.conversation()[:-1])
    assert chat.last.prompt_tokens == len(ids) - common_prefix_length(before, ids)
    assert tokens == _from_scratch(model, ids, len(tokens))


def test_closing_mid_answer_keeps_the_partial_answer(babbler):
    model, tokenizer, _ = babbler
    chat = ChatSession(model, tokenizer)
    stream = chat.stream("Tell me a story", max_tokens=50)
    partial = "".join(next(stream).text for _ in range(5))
    stream.close()
    assert chat.messages == [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": partial}]
    tokens = [r.token for r in chat.stream("Go on", max_tokens=8)]
    ids = tokenizer.apply_chat_template(chat.conversation()[:-1])
    assert tokens == _from_scratch(model, ids, len(tokens))


def test_reset_forgets_everything(memorized):
    model, tokenizer = memorized
    chat = ChatSession(model, tokenizer, system="Be kind.")
    "".join(chat.send(TRANSCRIPT[0]["content"], max_tokens=40))
    chat.reset()
    assert chat.messages == [] and chat.cached_ids == [] and chat.cache[0].offset == 0
    "".join(chat.send(TRANSCRIPT[0]["content"], max_tokens=40))
    sys_prompt = [{"role": "system", "content": "Be kind."}]
    assert chat.last.prompt_tokens == len(tokenizer.apply_chat_template(sys_prompt + TRANSCRIPT[:1]))


def test_saved_session_continues_identically(memorized, tmp_path):
    model, tokenizer = memorized
    a = ChatSession(model, tokenizer)
    "".join(a.send(TRANSCRIPT[0]["content"], max_tokens=40))
    a.save(tmp_path / "chat.safetensors")
    answer_a = [r.token for r in a.stream(TRANSCRIPT[2]["content"], max_tokens=40)]

    counting = CountingModel(model)
    b = ChatSession.load(tmp_path / "chat.safetensors", counting, tokenizer)
    assert b.messages == TRANSCRIPT[:2]
    answer_b = [r.token for r in b.stream(TRANSCRIPT[2]["content"], max_tokens=40)]
    assert answer_b == answer_a
    assert b.last.prompt_tokens == a.last.prompt_tokens  # the loaded cache was reused
    assert tokenizer.decode(answer_b) == TRANSCRIPT[3]["content"]


def test_session_file_errors_are_clear(memorized, babbler, tmp_path):
    model, tokenizer = memorized
    with pytest.raises(ValueError, match="no turns yet"):
        ChatSession(model, tokenizer).save(tmp_path / "empty.safetensors")
    chat = ChatSession(model, tokenizer)
    "".join(chat.send("Hi", max_tokens=3))
    chat.save(tmp_path / "s.safetensors")
    other = make_hf_checkpoint(tmp_path / "other", vocab_size=32000, num_key_value_heads=4)
    add_tokenizer(other)
    other_model, _ = load(other)
    with pytest.raises(ValueError, match="saved for another model"):
        ChatSession.load(tmp_path / "s.safetensors", other_model, tokenizer)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        ChatSession.load(tmp_path / "junk.safetensors", model, tokenizer)


def test_context_limit_cuts_answers_then_refuses_turns(babbler):
    model, tokenizer, _ = babbler
    chat = ChatSession(model, tokenizer, context_length=40)
    list(chat.stream("Hello there", max_tokens=100))  # random weights: no EOS before the limit
    assert chat.last.finish_reason == "length"
    assert chat.last.generation_tokens == 40 - len(tokenizer.apply_chat_template(chat.conversation()[:1]))
    assert chat.cache[0].offset <= 40
    messages = list(chat.messages)
    with pytest.raises(ContextLimitError, match="context is 40"):
        list(chat.stream("One more question that will not fit at all, however short the answer is"))
    assert chat.messages == messages  # the refused turn left no trace


def test_sliding_window_chat_matches_transformers_sliding_window(babbler):
    """max_kv_size=W: a conversation much longer than W keeps going, and every answer equals
    transformers' greedy answer with sliding_window=W over the whole conversation."""
    model, tokenizer, path = babbler
    window = 24
    hf = load_hf_model(path)
    hf.config.sliding_window = window
    hf.generation_config.eos_token_id = None
    chat = ChatSession(model, tokenizer, max_kv_size=window)
    for question in ["Hello there", "What next?", "Why though?"]:
        ids = tokenizer.apply_chat_template(chat.conversation() + [{"role": "user", "content": question}])
        tokens = [r.token for r in chat.stream(question, max_tokens=10)]
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=len(tokens),
                min_new_tokens=len(tokens),
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        assert tokens == ref
    assert chat.cache[0].offset > 2 * window
