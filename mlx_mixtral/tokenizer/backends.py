"""The two encoders behind `Tokenizer`: SentencePiece (`tokenizer.model`) and `tokenizers` (`tokenizer.json`).

Both reproduce what transformers' tokenizer does with the same files (transformers 5 builds a
`TokenizersBackend` for Mixtral directories):
- added tokens (control pieces such as <s> and [INST], the unknown piece, and tokens added by
  fine-tunes such as ChatML's <|im_start|>) are matched in the raw text first, longest match first;
- every stretch of text between them is encoded on its own. In SentencePiece's own ("legacy")
  mode each stretch gets the dummy-prefix "▁", exactly like `SentencePieceProcessor.encode`; in
  transformers' non-legacy mode only a stretch at the very start of the text gets it, and only when
  it does not already start with a space.

`encode_raw` is SentencePiece's plain encode with no added-token matching: mistral-common builds
its chat prompts this way, so text such as "[INST]" typed by a user stays text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlx_mixtral.tokenizer.detokenizer import SPACE, PieceTable, decode_pieces


@dataclass(frozen=True)
class AddedToken:
    """A token matched in text before the model encodes the rest (HF `AddedToken`)."""

    id: int
    content: str
    special: bool = True  # dropped by decode(skip_special=True)
    lstrip: bool = False  # also swallows the whitespace on its left
    rstrip: bool = False  # ... and on its right
    single_word: bool = False  # matches only as a whole word


class AddedTokenSplitter:
    """Splits text into runs of plain text and added-token ids (leftmost, then longest match)."""

    def __init__(self, tokens: Sequence[AddedToken]):
        self._by_content = {t.content: t for t in tokens if t.content}
        # Python's alternation takes the first alternative that matches at the leftmost position,
        # so listing longer contents first gives the leftmost-longest rule of `tokenizers`.
        alternatives = []
        for content in sorted(self._by_content, key=len, reverse=True):
            core = re.escape(content)
            if self._by_content[content].single_word:
                core = rf"(?<!\w){core}(?!\w)"
            alternatives.append(core)
        self._pattern = re.compile("|".join(alternatives)) if alternatives else None

    def split(self, text: str) -> Iterator[tuple[str, int]]:
        """Yields (text_run, offset) for plain text and ("", token_id) for an added token."""
        if self._pattern is None:
            if text:
                yield text, 0
            return
        start = 0
        for match in self._pattern.finditer(text):
            if match.start() < start:  # the previous token's rstrip already took this text
                continue
            token = self._by_content[match.group()]
            left, right = match.start(), match.end()
            if token.lstrip:
                while left > start and text[left - 1].isspace():
                    left -= 1
            if left > start:
                yield text[start:left], start
            yield "", token.id
            if token.rstrip:
                while right < len(text) and text[right].isspace():
                    right += 1
            start = right
        if start < len(text):
            yield text[start:], start


# --- SentencePiece -------------------------------------------------------------------------------


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """Protocol-buffer wire format: yields (field, wire_type, start, value_start, end) per field."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        value_start = i
        if wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, value_start = _read_varint(buf, i)
            i = value_start + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, start, value_start, i


# sentencepiece_model.proto: ModelProto.normalizer_spec = 3, NormalizerSpec.add_dummy_prefix = 3.
_NORMALIZER_SPEC, _ADD_DUMMY_PREFIX = 3, 3


def _normalizer_spec(model_proto: bytes) -> tuple[int, int, int]:
    for field, wire, start, value_start, end in _proto_fields(model_proto):
        if field == _NORMALIZER_SPEC and wire == 2:
            return start, value_start, end
    raise ValueError("the SentencePiece model has no normalizer_spec")


def adds_dummy_prefix(model_proto: bytes) -> bool:
    _, value_start, end = _normalizer_spec(model_proto)
    spec = model_proto[value_start:end]
    flag = True  # the proto's default
    for field, wire, _, v, _ in _proto_fields(spec):
        if field == _ADD_DUMMY_PREFIX and wire == 0:
            flag = bool(_read_varint(spec, v)[0])
    return flag


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """The same model with add_dummy_prefix = false (a later field wins in protobuf)."""
    start, value_start, end = _normalizer_spec(model_proto)
    spec = model_proto[value_start:end] + _varint(_ADD_DUMMY_PREFIX << 3) + b"\x00"
    return model_proto[:start] + _varint(_NORMALIZER_SPEC << 3 | 2) + _varint(len(spec)) + spec + model_proto[end:]


class SentencePieceBackend:
    def __init__(self, model_path: Path, added: Sequence[AddedToken], *, legacy: bool = True):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self._proto = self.sp.serialized_model_proto()
        self.add_dummy_prefix = adds_dummy_prefix(self._proto)
        self.legacy = legacy
        self._sp_no_prefix = None  # built on first need (non-legacy mode only)
        n = self.sp.get_piece_size()
        # transformers turns control pieces (<s>, </s>, [INST], ...) and the unknown piece into special
        # added tokens; user-defined pieces stay with SentencePiece, which already emits them whole.
        tokens = {
            i: AddedToken(i, self.sp.id_to_piece(i)) for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        for t in added:
            # An added token whose text is already a piece keeps the piece's id (tokenizers reuses it).
            piece = self.sp.piece_to_id(t.content)
            if t.id >= n and not self.sp.is_unknown(piece) and self.sp.id_to_piece(piece) == t.content:
                t = AddedToken(piece, t.content, t.special, t.lstrip, t.rstrip, t.single_word)
            tokens[t.id] = t
        self.added = tokens
        self.special_ids = frozenset(i for i, t in tokens.items() if t.special)
        self.vocab_size = max(n, max(tokens, default=-1) + 1)
        self._splitter = AddedTokenSplitter(list(tokens.values()))
        self._by_content = {t.content: i for i, t in tokens.items()}
        self._table: PieceTable | None = None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for run, where in self._splitter.split(text):
            if run:
                ids += self._encode_run(run, at_start=where == 0)
            else:
                ids.append(where)
        return ids

    def encode_raw(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_fragment(self, text: str) -> list[int]:
        if not self.add_dummy_prefix:
            return self.sp.encode(text)
        if self._sp_no_prefix is None:
            import sentencepiece

            self._sp_no_prefix = sentencepiece.SentencePieceProcessor(model_proto=without_dummy_prefix(self._proto))
        return self._sp_no_prefix.encode(text)

    def _encode_run(self, run: str, *, at_start: bool) -> list[int]:
        if self.legacy or not self.add_dummy_prefix:
            return self.sp.encode(run)
        # transformers' non-legacy Metaspace(prepend_scheme="first"): the prefix only at offset 0, and
        # not when the text already starts with a (meta-)space.
        if at_start and not run.startswith((" ", SPACE)):
            return self.sp.encode(run)
        return self.encode_fragment(run)

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return decode_pieces(self.piece_table(), ids, skip_special)

    def token_to_id(self, token: str) -> int | None:
        if token in self._by_content:
            return self._by_content[token]
        i = self.sp.piece_to_id(token)
        return None if self.sp.is_unknown(i) and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.added:
            return self.added[token_id].content
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def piece_table(self) -> PieceTable:
        if self._table is None:
            pieces = [self.id_to_token(i) for i in range(self.vocab_size)]
            self._table = PieceTable.from_pieces(pieces, self.special_ids, strip_left=1 if self.add_dummy_prefix else 0)
        return self._table


# --- tokenizers (tokenizer.json) -----------------------------------------------------------------


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if decoder is None:
        return []
    return decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]


def piece_decoder_spec(decoder: dict | None) -> dict | None:
    """If a tokenizer.json decoder is the SentencePiece family (see detokenizer.py), its parameters."""
    spec = {"space_piece": None, "byte_fallback": False, "strip_left": 0}
    order = ["Replace", "ByteFallback", "Fuse", "Strip"]
    last, fused = -1, False
    for step in _decoder_steps(decoder):
        kind = step.get("type")
        if kind not in order or order.index(kind) <= last:
            return None
        last = order.index(kind)
        if kind == "Replace":
            if step.get("pattern") != {"String": SPACE} or step.get("content") != " ":
                return None
            spec["space_piece"] = SPACE
        elif kind == "ByteFallback":
            spec["byte_fallback"] = True
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip":
            # Strip works per token: only after Fuse does it mean "the start of the whole text".
            if not fused or step.get("content") != " " or step.get("stop", 0) != 0:
                return None
            spec["strip_left"] = int(step.get("start", 0))
    return spec


class TokenizersBackend:
    def __init__(self, tokenizer_json: dict, extra_added: Sequence[AddedToken] = (), path: Path | None = None):
        from tokenizers import AddedToken as HFAddedToken
        from tokenizers import Tokenizer as HFTokenizer

        self._json = tokenizer_json
        self.tok = HFTokenizer.from_file(str(path)) if path else HFTokenizer.from_str(json.dumps(tokenizer_json))
        known = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
        missing = [
            t
            for t in sorted(extra_added, key=lambda t: t.id)
            if t.id not in known and self.tok.token_to_id(t.content) is None
        ]
        for t in missing:  # as transformers does for tokens named only in tokenizer_config.json
            self.tok.add_tokens(
                [
                    HFAddedToken(
                        t.content,
                        special=t.special,
                        lstrip=t.lstrip,
                        rstrip=t.rstrip,
                        single_word=t.single_word,
                        normalized=False,
                    )
                ]
            )
        specials = {t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
        self.special_ids = frozenset(specials | {t.id for t in missing if t.special})
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._raw = None  # built on first use, see encode_raw
        self._decoder_spec = piece_decoder_spec(tokenizer_json.get("decoder"))
        self._table: PieceTable | None = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_raw(self, text: str) -> list[int]:
        if self._raw is None:
            from tokenizers import Tokenizer as HFTokenizer

            # Built on first use (only the Mistral chat formats need it): the model without the added
            # tokens SentencePiece would not match in text. Special ones are its control pieces, never
            # matched; non-special ones inside the model's vocabulary are its user-defined pieces, always
            # matched; anything beyond it was added by a fine-tune and is unknown to SentencePiece.
            base = len(self._json.get("model", {}).get("vocab", ()))
            kept = [t for t in self._json.get("added_tokens", []) if not t.get("special") and t["id"] < base]
            self._raw = HFTokenizer.from_str(json.dumps({**self._json, "added_tokens": kept}))
            # A non-legacy Metaspace leaves out the dummy prefix when text starts with a space, where
            # SentencePiece still adds one; detect that behaviour rather than parse every pipeline.
            probe = [self._raw.encode(t, add_special_tokens=False).ids for t in (" x", "x")]
            self._raw_space_fix = probe[0] == probe[1]
        if self._raw_space_fix and text.startswith((" ", SPACE)):
            text = " " + text
        return self._raw.encode(text, add_special_tokens=False).ids

    def encode_fragment(self, text: str) -> list[int]:
        # Text after a newline is mid-text for every pre-tokenizer; "\n" itself is then cut off.
        newline = self.encode_raw("\n")
        ids = self.encode_raw("\n" + text)
        return ids[len(newline) :] if ids[: len(newline)] == newline else ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def piece_table(self) -> PieceTable | None:
        """None when the decoder is not of the SentencePiece family (streaming then uses a window)."""
        if self._decoder_spec is None:
            return None
        if self._table is None:
            pieces = [self.tok.id_to_token(i) for i in range(self.vocab_size)]
            self._table = PieceTable.from_pieces(pieces, self.special_ids, **self._decoder_spec)
        return self._table
