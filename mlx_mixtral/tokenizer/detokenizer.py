"""Token ids -> text, all at once or one token at a time.

SentencePiece-family decoders (every Mixtral tokenizer, as `tokenizer.model` or as the hub's
`tokenizer.json`) turn ids into text in four steps, the `tokenizers` decoder chain
`Replace("▁", " ") -> ByteFallback -> Fuse -> Strip(" ", n, 0)`:
  1. each token becomes its piece with the meta-space "▁" written as " ";
  2. each run of consecutive byte pieces `<0xHH>` becomes the UTF-8 text of those bytes, or one
     U+FFFD per byte when the run as a whole is not valid UTF-8;
  3. everything is joined;
  4. up to n leading spaces are removed from the whole text (the SentencePiece dummy prefix).
Special tokens skipped on decode are dropped *before* step 2, so they do not break a byte run.

`PieceDetokenizer` applies the same four steps incrementally with O(1) work per token, so the
concatenated chunks equal the full decode exactly: a byte run is held back until it ends (only then
is it known whether it decodes, or turns into replacement characters), and only the first
characters of the whole answer lose the dummy-prefix space. `WindowDetokenizer` is the fallback for
decoders outside this family: it re-decodes a short window of recent tokens, never the whole answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

SPACE = "\u2581"  # SentencePiece's meta-space "▁"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece


@dataclass(frozen=True)
class PieceTable:
    """Per-id decoding facts of a SentencePiece-family tokenizer."""

    texts: Sequence[str | None]  # piece with "▁" already turned into " "; None for an id the tokenizer lacks
    byte_values: Sequence[int]  # the byte of a <0xHH> piece, -1 for any other piece
    special: frozenset[int]  # ids dropped by decode(skip_special=True)
    strip_left: int  # leading spaces removed from the whole text (1 with a dummy prefix)

    @classmethod
    def from_pieces(
        cls,
        pieces: Sequence[str | None],
        special: frozenset[int],
        *,
        strip_left: int,
        space_piece: str | None = SPACE,
        byte_fallback: bool = True,
    ) -> PieceTable:
        texts, byte_values = [], []
        for piece in pieces:
            match = BYTE_PIECE.fullmatch(piece) if (byte_fallback and piece is not None) else None
            byte_values.append(int(match.group(1), 16) if match else -1)
            if piece is not None and space_piece:
                piece = piece.replace(space_piece, " ")
            texts.append(piece)
        return cls(texts, byte_values, special, strip_left)


class StreamingDetokenizer(Protocol):
    def add_token(self, token_id: int) -> str:
        """The text made final by this token ('' while it is held back)."""

    def finalize(self) -> str:
        """Whatever is still held back once generation has ended."""


def _bytes_text(run: bytearray) -> str:
    # Same rule as the `tokenizers` ByteFallback decoder: the whole run decodes, or each byte is U+FFFD.
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def decode_pieces(table: PieceTable, ids: Sequence[int], skip_special: bool = True) -> str:
    """Decode ids in one go; the reference that PieceDetokenizer reproduces chunk by chunk."""
    det = PieceDetokenizer(table, skip_special=skip_special)
    return "".join([det.add_token(i) for i in ids]) + det.finalize()


class PieceDetokenizer:
    """Exact incremental decoding for SentencePiece-family tokenizers (see the module docstring)."""

    def __init__(self, table: PieceTable, *, skip_special: bool = True, continuation: bool = False):
        self._table = table
        self._skip_special = skip_special
        self._run = bytearray()  # the byte pieces of the current, unfinished run
        # Dummy-prefix spaces still to remove from the very start; none when the text continues
        # earlier text (a completion after its prompt), where "▁word" must keep its space.
        self._strip_left = 0 if continuation else table.strip_left

    def add_token(self, token_id: int) -> str:
        table = self._table
        token_id = int(token_id)
        if not 0 <= token_id < len(table.texts) or table.texts[token_id] is None:
            return ""  # ids the tokenizer does not know decode to nothing, as in `tokenizers`
        if self._skip_special and token_id in table.special:
            return ""
        byte = table.byte_values[token_id]
        if byte >= 0:
            self._run.append(byte)
            return ""
        return self._emit(self._flush_run() + table.texts[token_id])

    def finalize(self) -> str:
        return self._emit(self._flush_run())

    def _flush_run(self) -> str:
        if not self._run:
            return ""
        text = _bytes_text(self._run)
        self._run = bytearray()
        return text

    def _emit(self, text: str) -> str:
        while self._strip_left and text:
            if text[0] != " ":
                self._strip_left = 0  # Strip stops at the first non-space character of the whole text
                break
            text = text[1:]
            self._strip_left -= 1
        return text


class WindowDetokenizer:
    """Incremental decoding for any decoder, by re-decoding a window of recent tokens.

    The window starts one emitted step back (`prefix`), so start-of-text rules such as stripping a
    leading space apply to tokens already emitted in both decodes and cancel out in the difference.
    Text ending in U+FFFD is held back: it is usually an incomplete UTF-8 character.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()):
        self._decode = decode
        # `context`: tokens already shown (e.g. the end of the prompt) that the window starts from,
        # so that the first new token decodes as a continuation rather than as the start of a text.
        self._ids: list[int] = [int(i) for i in context]
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens up to here have been emitted

    def add_token(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        window = self._ids[self._prefix :]
        text = self._decode(window)
        done = self._decode(self._ids[self._prefix : self._read])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        # Forget tokens that can no longer be part of any window, so memory stays bounded too.
        del self._ids[: self._prefix]
        self._read -= self._prefix
        self._prefix = 0
        return text[len(done) :]

    def finalize(self) -> str:
        text = self._decode(self._ids[self._prefix :])
        done = self._decode(self._ids[self._prefix : self._read])
        self._ids.clear()
        self._prefix = self._read = 0
        return text[len(done) :]
