"""How text enters the program, whatever it comes through: one rule.

Text is UTF-8. A byte sequence that is not valid UTF-8 becomes U+FFFD, one per maximal invalid
subsequence (Python's "replace" handler, the practice the Unicode standard recommends), and so does
a lone surrogate (U+D800..U+DFFF), which no UTF-8 text can hold. Python hands out strs that carry
such code points: argv and environment variables are decoded with surrogateescape (the byte 0xE9 of
a Latin-1 "café" becomes U+DCE9), and JSON may spell one ("caf\\udce9"). Left in, they fail later
and far away: the tokenizer, a JSON response or the terminal cannot encode them.

The boundaries that apply the rule: text flags (argparse `type=argv_text`), stdin
(`configure_stdio`), JSON request bodies and saved chat sessions (`clean_json`), and
`Tokenizer.encode` for text passed from Python. Paths are not text: they stay as the OS gave
them, so a file whose name is not UTF-8 can still be opened.
"""

from __future__ import annotations

import io
import re
import sys
from typing import Any

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode(data: bytes) -> str:
    """Bytes as text: UTF-8, invalid sequences replaced by U+FFFD."""
    return data.decode("utf-8", errors="replace")


def clean(text: str) -> str:
    """A str with every lone surrogate replaced by U+FFFD (JSON strings, Python callers)."""
    return _SURROGATE.sub(REPLACEMENT, text) if _SURROGATE.search(text) else text


def argv_text(arg: str) -> str:
    """A command-line (or environment) string as text. Python decoded the OS's bytes with
    surrogateescape; they are recovered and decoded as bytes are, so an invalid byte in argv gives
    the same text as the same byte on stdin."""
    if not _SURROGATE.search(arg):
        return arg
    try:
        return decode(arg.encode("utf-8", errors="surrogateescape"))
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte: not from the OS
        return clean(arg)


def clean_json(value: Any) -> Any:
    """A parsed JSON value with `clean` applied to every string in it, keys included."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    if isinstance(value, dict):
        return {clean(k): clean_json(v) for k, v in value.items()}
    return value


def configure_stdio() -> None:
    """Read stdin by the rule (UTF-8, U+FFFD for what is not) whatever the locale says, and write
    a path from argv to stdout as the bytes it was given as."""
    stdin, stdout = sys.stdin, sys.stdout
    if isinstance(stdin, io.TextIOWrapper):
        try:
            stdin.reconfigure(encoding="utf-8", errors="replace")
        except io.UnsupportedOperation:  # something was read already; at least stop failing on it
            stdin.reconfigure(errors="replace")
    if isinstance(stdout, io.TextIOWrapper):
        stdout.reconfigure(errors="surrogateescape")
