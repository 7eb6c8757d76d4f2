"""Tools in the prompt: OpenAI tool definitions and tool messages, in Mistral's v3 format or the generic one.

Two tool formats, chosen by the vocabulary (`tool_format`):
- "mistral": the vocabulary has Mistral's control tokens (Mixtral-8x22B, v3). Encoded exactly as
  mistral-common's `InstructTokenizerV3` encodes a `ChatCompletionRequest(messages, tools)`:
    [AVAILABLE_TOOLS] encode(json.dumps(tools)) [/AVAILABLE_TOOLS]  just before the last [INST],
      each tool {"type": "function", "function": {"name", "description", "parameters"}};
    an assistant's calls: [TOOL_CALLS] encode(json.dumps([{"name", "arguments", "id"}, ...])) EOS,
      arguments as parsed JSON (a string when they do not parse, {} when empty);
    a tool result: [TOOL_RESULTS] encode(json.dumps({"content", "call_id"})) [/TOOL_RESULTS],
      content as parsed JSON when it parses;
  with json.dumps' default separators and ensure_ascii=False. Call ids must be 9 letters or digits
  (mistral-common's v3 rule): ids this server makes are; any other id is mapped to 9 characters
  derived from it, the same for the call and its result. The model answers a call with
  [TOOL_CALLS] followed by the JSON list of {"name", "arguments"}.
- "generic" (Mixtral-8x7B, v1, and any model without those tokens): the model is told the tools and
  the answer format in a system message, and the grammar holds it to that format (after llama.cpp's
  "generic" tool format): the whole answer is one JSON object,
      {"tool_calls": [{"name": "<tool>", "arguments": {...}}, ...]}   to call tools, or
      {"response": "<text for the user>"}                              to answer.
  Earlier turns are written the same way: calls as that object, tool results as user messages
  {"tool_response": {"tool": "<name>", "tool_call_id": "<id>", "content": ...}}.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import Any

from mlx_mixtral.errors import ChatTemplateError, SchemaError

MISTRAL, GENERIC = "mistral", "generic"
TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # mistral-common's (and OpenAI's) function names
MISTRAL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ID_CHARS = string.ascii_letters + string.digits

GENERIC_INSTRUCTIONS = (
    "You can call tools. Answer with one JSON object and nothing else: "
    '{{"tool_calls": [{{"name": <tool name>, "arguments": <arguments object>}}]}} to call one or more tools, '
    'or {{"response": <your answer>}} to answer the user directly. A tool\'s result comes back as '
    '{{"tool_response": {{"tool": <tool name>, "tool_call_id": <id>, "content": <result>}}}}.\n\n'
    "Tools:\n{tools}"
)


def new_call_id() -> str:
    """A fresh tool-call id of 9 letters and digits (valid for every tool format)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def mistral_call_id(call_id: str) -> str:
    """`call_id` if mistral-common accepts it (9 letters or digits), else 9 such characters derived from it."""
    if MISTRAL_ID.fullmatch(call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    out = ""
    for _ in range(9):
        digest, r = divmod(digest, len(_ID_CHARS))
        out += _ID_CHARS[r]
    return out


def check_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI tool definitions, checked, as {"type": "function", "function": {name, description, parameters}}
    (a missing description is "", missing parameters {} as in mistral-common)."""
    from mlx_mixtral.grammar import check_schema

    out = []
    seen = set()
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise SchemaError(f'{where}: expected {{"type": "function", "function": {{...}}}}', option="tools")
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise SchemaError(f"{where}.function: expected an object with a name", option="tools")
        name = function["name"]
        if not NAME.fullmatch(name):
            raise SchemaError(f"{where}.function.name {name!r}: expected 1-64 letters, digits, _ or -", option="tools")
        if name in seen:
            raise SchemaError(f"{where}.function.name {name!r}: two tools have this name", option="tools")
        seen.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise SchemaError(f"{where}.function.description: expected a string", option="tools")
        parameters = check_schema(function.get("parameters") or {}, f"{where}.function.parameters")
        out.append(
            {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}
        )
    return out


def tool_format(special_tokens: set[str]) -> str:
    """MISTRAL when the vocabulary has [TOOL_CALLS] as a control token, else GENERIC."""
    return MISTRAL if TOOL_CALLS_TOKEN in special_tokens else GENERIC


def _json_or_text(text: str) -> Any:
    """mistral-common's normalisation of arguments and tool results: "" is {}, JSON is parsed, else the text."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def call_arguments(arguments: Any) -> Any:
    """A call's arguments as a value: OpenAI sends a JSON string, Python callers may pass a dict."""
    return arguments if isinstance(arguments, (dict, list)) else _json_or_text(arguments or "")


def check_tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as [{"id", "name", "arguments" (a value)}]."""
    if not isinstance(calls, list):
        raise ChatTemplateError(f"message {index}: tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ChatTemplateError(f"message {index}: tool_calls[{j}] needs a function with a name")
        if not NAME.fullmatch(function["name"]):
            raise ChatTemplateError(
                f"message {index}: tool_calls[{j}] function name {function['name']!r}: "
                "expected 1-64 letters, digits, _ or -"
            )
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise ChatTemplateError(f"message {index}: tool_calls[{j}] needs an id")
        out.append({"id": call_id, "name": function["name"], "arguments": call_arguments(function.get("arguments"))})
    return out


# --- the Mistral (v3) format -------------------------------------------------------------------------


def available_tools_json(tools: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(list(tools), ensure_ascii=False)


def mistral_calls_json(calls: Sequence[Mapping[str, Any]]) -> str:
    prepared = [{"name": c["name"], "arguments": c["arguments"], "id": mistral_call_id(c["id"])} for c in calls]
    return json.dumps(prepared, ensure_ascii=False)


def mistral_result_json(content: str, call_id: str) -> str:
    return json.dumps({"content": _json_or_text(content), "call_id": mistral_call_id(call_id)}, ensure_ascii=False)


# --- the generic format ------------------------------------------------------------------------------


def generic_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The conversation in the generic format (see the module docstring), as plain system/user/assistant
    messages any chat format takes: the tools and instructions first as a system message."""
    from mlx_mixtral.tokenizer.chat_template import content_text

    out: list[dict] = []
    if tools:
        out.append({"role": "system", "content": GENERIC_INSTRUCTIONS.format(tools=available_tools_json(tools))})
    previous = None
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise ChatTemplateError(f"message {i}: role 'tool' cannot follow role {previous!r}")
        previous = role
        if role == "tool":
            result = {"tool": m.get("name"), "tool_call_id": m.get("tool_call_id"), "content": None}
            result["content"] = _json_or_text(content_text(m.get("content"), i))
            out.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
        elif role == "assistant" and m.get("tool_calls"):
            calls = check_tool_calls(m["tool_calls"], i)
            body = [{"name": c["name"], "arguments": c["arguments"], "id": c["id"]} for c in calls]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": body}, ensure_ascii=False)})
        elif role == "assistant" and tools and m.get("content"):
            text = content_text(m.get("content"), i)
            out.append({"role": "assistant", "content": json.dumps({"response": text}, ensure_ascii=False)})
        else:
            out.append(dict(m))
    return out


def jinja_messages(messages: Sequence[Mapping[str, Any]], fmt: str) -> list[dict]:
    """Messages for a Jinja template that takes tools (transformers' convention): call arguments as
    values, not JSON strings; call ids in Mistral's form when the template is Mistral's."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = check_tool_calls(m["tool_calls"], i)
            m["tool_calls"] = [
                {
                    "id": mistral_call_id(c["id"]) if fmt == MISTRAL else c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls
            ]
        if m.get("role") == "tool" and fmt == MISTRAL and isinstance(m.get("tool_call_id"), str):
            m["tool_call_id"] = mistral_call_id(m["tool_call_id"])
        out.append(m)
    return out
