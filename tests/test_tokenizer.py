"""encode/decode against transformers' tokenizer of the same files, and SentencePiece itself."""

import json
import random
import shutil

import pytest
from helpers.tiny_models import mistral_tokenizer_path
from helpers.tokenizer_fixtures import (
    BASE_VOCAB,
    BYTE0,
    CORPUS,
    hf_tokenizer,
    loaded_tokenizer,
    tokenizer_config,
    tokenizer_dir,
    write_sp_dir,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_mixtral.errors import TokenizerError
from mlx_mixtral.tokenizer import load_tokenizer

KINDS = [
    "v1",
    "v1-json",
    "v3",
    "v3-json",
    "v1-nonlegacy",
    "v1-nonlegacy-json",
    "v1-both",
    "v1-nonlegacy-both",
    "v3-hubjson",
]


def _random_texts(seed: int, count: int) -> list[str]:
    """Random mixtures of corpus fragments, special-token strings and odd characters."""
    rng = random.Random(seed)
    atoms = [
        *CORPUS,
        " ",
        "  ",
        "\n",
        "</s>",
        "<s>",
        "<|im_start|>",
        "<|im_end|>",
        "[INST]",
        "▁",
        "\u00a0",
        chr(rng.randrange(0x4E00, 0x9FFF)),
        chr(rng.randrange(0x1F300, 0x1FAFF)),
        "ab",
        "Z",
    ]
    return [
        "".join(rng.choice(atoms)[: rng.randrange(1, 12)] for _ in range(rng.randrange(1, 8))) for _ in range(count)
    ]


TEXTS = CORPUS + _random_texts(0, 150)


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    return request.param, loaded_tokenizer(request.param), hf_tokenizer(str(tokenizer_dir(request.param)))


def test_backend_follows_the_files(pair):
    kind, ours, _ = pair
    expected = "TokenizersBackend" if kind.endswith("json") else "SentencePieceBackend"
    assert type(ours._backend).__name__ == expected


def test_encode_matches_transformers(pair):
    kind, ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), (kind, text)
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), (kind, text)
        assert ours.encode(text, bos=False) == ours.encode(text, add_special_tokens=False)  # the older name


def test_decode_matches_transformers(pair):
    kind, ours, hf = pair
    rng = random.Random(1)
    n = BASE_VOCAB[kind[:2]]
    sequences = [hf.encode(t) for t in TEXTS[:60]]
    # Random ids favouring the troublesome ones: byte pieces (3..258 in v1, 771.. in v3),
    # specials, the meta-space piece, the ChatML tokens, and ids past the end of the vocabulary.
    byte0 = BYTE0[kind[:2]]
    interesting = [0, 1, 2, 3, 4, n, n + 1, n + 5, 28705, 29473, *range(byte0, byte0 + 256)]
    for _ in range(300):
        sequences.append(
            [rng.choice(interesting) if rng.random() < 0.6 else rng.randrange(n) for _ in range(rng.randrange(1, 14))]
        )
    for ids in sequences:
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), (kind, ids)
        assert ours.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False), (kind, ids)


def test_token_bytes_add_up_to_transformers_text(pair):
    """Each token's bytes (what logprobs show), joined, are transformers' decoded text: byte-fallback
    pieces are single bytes of a multi-byte character, the meta-space is a space."""
    kind, ours, hf = pair
    for text in TEXTS[:80]:
        ids = hf.encode(text, add_special_tokens=False)
        joined = b"".join(ours.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        decoded = hf.decode(ids)
        assert joined in (decoded, " " + decoded), (kind, text)  # the dummy-prefix space is kept
    assert ours.token_bytes(ours.eos_token_id) == b"</s>"


def test_sentencepiece_and_tokenizer_json_dirs_agree():
    for base in ("v1", "v3", "v1-nonlegacy"):
        sp_tok, json_tok = loaded_tokenizer(base), loaded_tokenizer(base + "-json")
        for text in TEXTS:
            assert sp_tok.encode(text) == json_tok.encode(text), (base, text)
            ids = sp_tok.encode(text)
            assert sp_tok.decode(ids) == json_tok.decode(ids), (base, text)
        assert sp_tok.vocab_size == json_tok.vocab_size == BASE_VOCAB[base[:2]] + 2


@pytest.mark.parametrize("kind", KINDS)
def test_raw_encoding_is_sentencepiece(kind):
    """The Mistral chat formats encode message text as SentencePiece does, whatever the files."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_path(kind[:2])))
    backend = loaded_tokenizer(kind)._backend
    for text in TEXTS:
        assert backend.encode_raw(text) == sp.encode(text), (kind, text)


def test_special_ids_and_eos_set():
    for kind in ("v1", "v3-json"):
        tok = loaded_tokenizer(kind)
        n = BASE_VOCAB[kind[:2]]
        assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
        assert tok.eos_token_ids == frozenset({2, n})  # generation_config.json lists <|im_end|> too
        assert tok.token_to_id("<|im_start|>") == n + 1 and tok.id_to_token(n + 1) == "<|im_start|>"


def test_bare_sentencepiece_model(tmp_path):
    """Only tokenizer.model (Mistral's own download layout): SentencePiece ids, BOS in front."""
    import sentencepiece

    path = tmp_path / "bare"
    path.mkdir()
    shutil.copy(mistral_tokenizer_path("v3"), path / "tokenizer.model.v3")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model.v3"))
    tok = load_tokenizer(path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 32768)
    assert tok.chat_template_name == "mistral-v3"
    for text in CORPUS:
        if "<" not in text and "[" not in text:  # no special-token strings: plain SentencePiece
            assert tok.encode(text) == [1, *sp.encode(text)], text


def test_added_token_flags_match_transformers(tmp_path):
    """lstrip/rstrip/single_word and non-special added tokens, as a fine-tune might declare them."""
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    extra = {
        32002: {**flags, "content": "<tool>", "lstrip": True, "rstrip": True, "special": True},
        32003: {**flags, "content": "<word>", "single_word": True, "special": False},
        32004: {**flags, "content": "<tool>call", "special": True},  # overlaps <tool>: longest wins
        # Already a piece of the vocabulary: transformers keeps the piece's id (10993), not 32005.
        32005: {**flags, "content": "WORD", "special": False},
    }
    path = write_sp_dir(tmp_path / "flags", "v1", tokenizer_config("v1", extra_added=extra))
    ours, hf = load_tokenizer(path), hf_tokenizer(str(path))
    texts = [
        "a <tool> b",
        "a<tool>b",
        "x \n <tool>\n\ny",
        "<tool><tool>  <tool>",
        "<word> here",
        "a<word>b",
        "a <word> b",
        "<word>s <word>",
        "<tool>call me <tool>cal",
        " WORD",
        "WORD here",
        "x WORD y",
        "<|im_start|> <tool> WORD <word>",
    ]
    assert ours.vocab_size == len(hf) == 32005
    for text in texts:
        assert ours.encode(text) == hf.encode(text), text
        ids = hf.encode(text)
        assert ours.decode(ids, skip_special=False) == hf.decode(ids), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def test_added_tokens_json_and_special_tokens_map(tmp_path):
    """Older fine-tunes: tokens in added_tokens.json, specials in special_tokens_map.json."""
    path = write_sp_dir(tmp_path / "old", "v1", {"add_bos_token": True, "add_eos_token": False})
    (path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32000, "<|im_start|>": 32001}))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"})
    )
    tok, hf = load_tokenizer(path), hf_tokenizer(str(path))
    assert tok.eos_token_id == hf.eos_token_id == 32000 and 2 in tok.eos_token_ids  # config.json's eos_token_id
    for text in ["<|im_start|>hi<|im_end|>", "a <|im_end|> b", "<s>x</s>"]:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(hf.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True), text
    assert tok.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)[::2] == [32001, 32000]


def test_missing_tokenizer_files_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "tokenizer.model" in message and "tokenizer.json" in message
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(tmp_path / "nope")


def test_bad_files_errors(tmp_path):
    path = write_sp_dir(tmp_path / "bad", "v1", None)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(path)
    (path / "tokenizer_config.json").write_text("{}")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(TokenizerError, match=r"generation_config\.json: eos_token_id must be an int"):
        load_tokenizer(path)
    (path / "generation_config.json").unlink()
    (path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: cannot load") as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    | st.lists(
        st.sampled_from(["<s>", "</s>", "<|im_start|>", " ", "  ", "\n", "a", "▁", "é", "🦙", "[INST]"]), max_size=12
    ).map("".join)
)
def test_any_text_encodes_like_transformers(text):
    for kind in ("v1", "v3-json", "v1-nonlegacy"):
        assert loaded_tokenizer(kind).encode(text) == hf_tokenizer(str(tokenizer_dir(kind))).encode(text), (kind, text)
