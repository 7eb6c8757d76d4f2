"""The model's answer -> OpenAI `tool_calls` (and content), whole or as streamed deltas.

Answers in the two tool formats (tokenizer/tools.py):
    mistral:  [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]     (the control token first)
    generic:  {"tool_calls": [{"name": "f", "arguments": {...}}, ...]}  or  {"response": "text"}
Anything else is plain content. `ToolCallStream` reads the answer's text as it streams with a small
JSON scanner and says what it adds: content text, a call's start (index, id, name) once its name is
complete, pieces of a call's arguments as written (so the pieces joined are the arguments string).
`finish()` then checks the whole answer: if it is not a well-formed tool-call answer (a model
writing free text, an answer cut off by max_tokens), the whole text is content instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from mlx_mixtral.tokenizer.tools import GENERIC, MISTRAL, new_call_id

_PARTIAL_ESCAPE = re.compile(r"(?<!\\)(\\\\)*\\(u[0-9a-fA-F]{0,3})?$|\\u[dD][89abAB][0-9a-fA-F]{2}$")


@dataclass
class Call:
    id: str
    name: str = ""
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    """What one piece of text adds: content, or for call `index` its start (id and name) and/or arguments."""

    content: str = ""
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class _Frame:
    kind: str  # "{" or "["
    key: str | None = None  # the key whose value comes next (objects)
    expect: str = "key"  # objects: "key" or "value"; arrays: "value"
    index: int = 0  # arrays: the item being written


@dataclass
class ToolCallStream:
    """One answer's scanner (see the module docstring). `fmt` is the tool format; `tool_token` the
    id of [TOOL_CALLS] (mistral format)."""

    fmt: str
    tool_token: int | None = None
    calls: list[Call] = field(default_factory=list)
    text: str = ""
    mode: str = "unknown"  # "calls", "response" (generic), "content"
    _stack: list[_Frame] = field(default_factory=list)
    _in_string: bool = False
    _escaped: bool = False
    _string: str = ""  # the raw text of the string being read
    _sent: int = 0  # characters of the response string's decoded text already sent
    _started: bool = False

    def feed(self, token: int, text: str) -> list[Delta]:
        """The deltas that `token` (whose text is `text`) adds."""
        if not self._started:
            self._started = True
            if self.fmt == MISTRAL:
                self.mode = "calls" if token == self.tool_token else "content"
        self.text += text
        if self.mode == "content":
            return [Delta(content=text)] if text else []
        out: list[Delta] = []
        for ch in text:
            self._char(ch, out)
        if (
            self.fmt == GENERIC
            and self.mode == "unknown"
            and self.text.strip()
            and not self.text.lstrip().startswith("{")
        ):
            self.mode = "content"
            out.append(Delta(content=self.text))
        return _merge(out)

    def finish(self) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of the whole answer; a malformed tool-call answer is all content."""
        if self.mode == "content" or not self.text.strip():
            return self.text, None
        try:
            value = json.loads(self.text)
        except json.JSONDecodeError:
            return self.text, None
        if self.mode == "response" and isinstance(value, dict) and isinstance(value.get("response"), str):
            return value["response"], None
        if self.mode == "response" and isinstance(value, dict) and "response" in value:  # a JSON-schema answer
            return json.dumps(value["response"], ensure_ascii=False), None
        listed = value if self.fmt == MISTRAL else (value.get("tool_calls") if isinstance(value, dict) else None)
        if not (isinstance(listed, list) and listed and len(listed) == len(self.calls)):
            return self.text, None
        for call, item in zip(self.calls, listed):
            if not (isinstance(item, dict) and item.get("name") == call.name and "arguments" in item):
                return self.text, None
            try:
                json.loads(call.arguments)
            except json.JSONDecodeError:
                return self.text, None
        return None, [call.openai() for call in self.calls]

    # --- the scanner -----------------------------------------------------------------------------

    def _call_depth(self) -> int:
        """Stack depth of a call object: [ { (mistral), { "tool_calls": [ { (generic)."""
        return 2 if self.fmt == MISTRAL else 3

    def _in_arguments(self, ch: str) -> bool:
        """Whether `ch` is part of the value of a call's "arguments"."""
        d = self._call_depth()
        if len(self._stack) < d or not self._is_call_path():
            return False
        if len(self._stack) > d:
            return self._stack[d - 1].key == "arguments"
        top = self._stack[-1]
        if top.key != "arguments" or top.expect != "value":
            return False
        return self._in_string or not (ch.isspace() or ch in ",}")

    def _is_call_path(self) -> bool:
        kinds = [f.kind for f in self._stack[: self._call_depth()]]
        if self.fmt == MISTRAL:
            return kinds == ["[", "{"]
        return kinds == ["{", "[", "{"] and self._stack[0].key == "tool_calls"

    def _call_index(self) -> int:
        return self._stack[self._call_depth() - 2].index

    def _char(self, ch: str, out: list[Delta]) -> None:
        if self._in_arguments(ch):
            index = self._call_index()
            self._calls_at(index).arguments += ch
            out.append(Delta(index=index, arguments=ch))
        if self._in_string:
            self._string_char(ch, out)
            return
        if ch == '"':
            self._in_string, self._string = True, ""
        elif ch in "{[":
            if not self._stack and self.fmt == MISTRAL:
                self.mode = "calls"
            self._stack.append(_Frame(ch, expect="key" if ch == "{" else "value"))
        elif ch in "}]":
            if self._stack:
                self._stack.pop()
        elif ch == ":" and self._stack:
            self._stack[-1].expect = "value"
        elif ch == "," and self._stack:
            top = self._stack[-1]
            if top.kind == "{":
                top.expect, top.key = "key", None
            else:
                top.index += 1

    def _string_char(self, ch: str, out: list[Delta]) -> None:
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False
            self._string_done(out)
            return
        self._string += ch
        if self._is_response_string():
            self._send_response(out, final=False)

    def _is_response_string(self) -> bool:
        return (
            self.fmt == GENERIC
            and len(self._stack) == 1
            and self._stack[0].key == "response"
            and self._stack[0].expect == "value"
        )

    def _send_response(self, out: list[Delta], final: bool) -> None:
        raw = self._string
        while not final and (partial := _PARTIAL_ESCAPE.search(raw)):  # an escape not yet complete waits
            raw = raw[: partial.start()]
        try:
            decoded = json.loads('"' + raw + '"')
        except json.JSONDecodeError:
            return
        if len(decoded) > self._sent:
            out.append(Delta(content=decoded[self._sent :]))
            self._sent = len(decoded)

    def _string_done(self, out: list[Delta]) -> None:
        if not self._stack:
            return
        top = self._stack[-1]
        if top.kind == "{" and top.expect == "key":
            top.key = self._string
            if self.fmt == GENERIC and len(self._stack) == 1 and self.mode == "unknown":
                self.mode = {"response": "response", "tool_calls": "calls"}.get(top.key, "unknown")
            return
        if self._is_response_string():
            self._send_response(out, final=True)
        elif self._is_call_path() and len(self._stack) == self._call_depth() and top.key == "name":
            index = self._call_index()
            call = self._calls_at(index)
            try:
                call.name = json.loads('"' + self._string + '"')
            except json.JSONDecodeError:
                call.name = self._string
            out.append(Delta(index=index, id=call.id, name=call.name))

    def _calls_at(self, index: int) -> Call:
        while len(self.calls) <= index:
            self.calls.append(Call(id=new_call_id()))
        return self.calls[index]


def _merge(deltas: list[Delta]) -> list[Delta]:
    """Adjacent deltas of the same kind joined (one per character is too many events)."""
    out: list[Delta] = []
    for d in deltas:
        last = out[-1] if out else None
        if last and d.content and last.content and last.index is None and d.index is None:
            last.content += d.content
        elif last and d.arguments and last.index == d.index and d.name is None and (last.arguments or last.name):
            last.arguments += d.arguments
        else:
            out.append(d)
    return out
