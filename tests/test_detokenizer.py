"""Streaming decoding: the chunks joined equal transformers' decode of all tokens, for any ids."""

import json
import shutil

import pytest
from helpers.tokenizer_fixtures import BASE_VOCAB, BYTE0, hf_tokenizer, loaded_tokenizer, tokenizer_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_mixtral.tokenizer import load_tokenizer
from mlx_mixtral.tokenizer.detokenizer import PieceDetokenizer, WindowDetokenizer

SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
KINDS = ["v1", "v3-json"]


def _stream(det, ids):
    chunks = [det.add_token(i) for i in ids]
    return chunks + [det.finalize()]


def _ids(kind):
    """Token ids weighted towards the hard cases: byte pieces (partial UTF-8), specials between
    bytes, the bare meta-space piece, added tokens, and ids past the end of the vocabulary."""
    n = BASE_VOCAB[kind[:2]]
    byte0 = BYTE0[kind[:2]]
    space = 28705 if kind.startswith("v1") else 29473
    utf8_lead = st.sampled_from([byte0 + b for b in (0xC3, 0xE2, 0xE6, 0xF0, 0xF0)])
    utf8_cont = st.integers(byte0 + 0x80, byte0 + 0xBF)
    token = st.one_of(
        st.integers(3, n - 1),
        st.integers(byte0, byte0 + 255),
        utf8_lead,
        utf8_cont,
        st.sampled_from([0, 1, 2, space, n, n + 1, n + 7]),
    )
    return st.lists(token, max_size=40)


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    return request.param, loaded_tokenizer(request.param), hf_tokenizer(str(tokenizer_dir(request.param)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip_special", [True, False])
@SETTINGS
@given(data=st.data())
def test_chunks_join_to_the_full_decode(kind, skip_special, data):
    ours, hf = loaded_tokenizer(kind), hf_tokenizer(str(tokenizer_dir(kind)))
    ids = data.draw(_ids(kind))
    chunks = _stream(ours.detokenizer(skip_special=skip_special), ids)
    full = hf.decode(ids, skip_special_tokens=skip_special)
    assert "".join(chunks) == full
    # A replacement character is only ever emitted where the full decode has one too.
    assert sum(c.count("\ufffd") for c in chunks) == full.count("\ufffd")


@SETTINGS
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=60))
def test_streamed_text_is_never_broken(text):
    for kind in KINDS:
        ours = loaded_tokenizer(kind)
        ids = ours.encode(text, add_special_tokens=False)
        chunks = _stream(ours.detokenizer(), ids)
        assert "".join(chunks) == ours.decode(ids)
        assert not any("\ufffd" in c for c in chunks), (text, chunks)


def test_space_between_words_survives_chunk_boundaries(pair):
    _, ours, _ = pair
    ids = ours.encode("Hello world, how  are you?", add_special_tokens=False)
    chunks = _stream(ours.detokenizer(), ids)
    assert chunks[:2] == ["Hello", " world"]  # only the very first word loses its dummy-prefix space
    assert "".join(chunks) == "Hello world, how  are you?"
    # A fresh detokenizer per answer: an answer starting with a space piece decodes as decode() does.
    ids = ours.encode(" Sure", add_special_tokens=False)
    assert _stream(ours.detokenizer(), ids) == ["", " Sure", ""] and ours.decode(ids) == " Sure"


def test_incomplete_utf8_is_held_back(pair):
    kind, ours, hf = pair
    byte0 = BYTE0[kind[:2]]
    emoji = [byte0 + b for b in "🦙".encode()]  # a rare emoji: four byte-fallback pieces
    x = ours.encode("x", add_special_tokens=False)
    det = ours.detokenizer()
    assert [det.add_token(i) for i in emoji] == ["", "", "", ""]
    assert det.add_token(x[0]) == "🦙 x"
    # A run that never completes becomes replacement characters, one per byte, as transformers does.
    det = ours.detokenizer()
    chunks = [det.add_token(i) for i in [*emoji[:2], *x]] + [det.finalize()]
    assert chunks == ["", "", "\ufffd\ufffd x", ""] and "".join(chunks) == hf.decode([*emoji[:2], *x])
    # Skipped special tokens inside a run do not break it.
    det = ours.detokenizer()
    assert "".join([det.add_token(i) for i in [emoji[0], 2, *emoji[1:], 1]] + [det.finalize()]) == "🦙"


def test_constant_work_per_token(pair, monkeypatch):
    """The exact detokenizer never re-decodes; the window fallback decodes only a few tokens."""
    _, ours, _ = pair
    ids = ours.encode("The quick brown fox jumps over the lazy dog. 日本語 😀 " * 150, add_special_tokens=False)
    assert len(ids) > 2500
    det = ours.detokenizer()
    assert isinstance(det, PieceDetokenizer)
    monkeypatch.setattr(ours._backend, "decode", lambda *a: pytest.fail("re-decoded"))
    text = "".join(_stream(det, ids))
    monkeypatch.undo()
    assert text == ours.decode(ids)
    windows = []

    def decode(window):
        windows.append(len(window))
        return ours.decode(window)

    assert "".join(_stream(WindowDetokenizer(decode), ids)) == text
    assert max(windows) <= 8  # the longest is an emoji's four byte pieces and its neighbours


@pytest.fixture(scope="module")
def window_tokenizer(tmp_path_factory):
    """A tokenizer.json whose decoder is not of the SentencePiece family (Metaspace decoder, no
    byte fallback), so streaming must fall back to the window detokenizer."""
    source = tokenizer_dir("v1-json")
    path = tmp_path_factory.mktemp("metaspace")
    for f in source.iterdir():
        shutil.copy(f, path / f.name)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return load_tokenizer(path), hf_tokenizer(str(path))


@pytest.mark.parametrize("skip_special", [True, False])
@SETTINGS
@given(data=st.data())
def test_window_fallback_joins_to_the_full_decode(window_tokenizer, skip_special, data):
    ours, hf = window_tokenizer
    ids = data.draw(_ids("v1"))
    det = ours.detokenizer(skip_special=skip_special)
    assert isinstance(det, WindowDetokenizer)
    assert "".join(_stream(det, ids)) == hf.decode(ids, skip_special_tokens=skip_special)


def test_window_fallback_holds_incomplete_characters(pair):
    """With byte-fallback pieces the window fallback waits for whole characters too. (It is exact
    for valid UTF-8; an invalid run after a valid one is where only PieceDetokenizer is exact.)"""
    _, ours, _ = pair
    ids = ours.encode("llama 🦙🦙 and 𝄞 and 日本", add_special_tokens=False)
    chunks = _stream(WindowDetokenizer(ours.decode), ids)
    assert "".join(chunks) == ours.decode(ids) and not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("window", [False, True])
def test_continuation_keeps_the_first_space(pair, window_tokenizer, window):
    """A completion streamed after its prompt: prompt text + chunks == decode(prompt + completion)."""
    _, ours, _ = pair
    if window:
        ours = window_tokenizer[0]
    prompt = ours.encode("The capital of France is", add_special_tokens=False)
    completion = ours.encode("The capital of France is Paris, 🦙 not Lyon", add_special_tokens=False)[len(prompt) :]
    det = ours.detokenizer(continuation=True)
    assert isinstance(det, WindowDetokenizer) == window
    chunks = _stream(det, completion)
    assert chunks[0] == " Paris"
    assert ours.decode(prompt) + "".join(chunks) == ours.decode(prompt + completion)
