"""Chat prompts: Mistral's instruct formats as mistral-common encodes them, and Jinja chat templates.

Mistral formats (mistral-common 1.x, `InstructTokenizerV1` / `V3` with the request normalizer and
validator that `MistralTokenizer.encode_chat_completion` runs):
- the conversation is checked: roles system/user/assistant (and tool, v3 only); system may be followed
  by system/user/assistant, user by user/assistant/system, assistant by user/assistant/tool, tool by
  tool/assistant/user; a single message must be user or system; assistant messages need content or
  tool calls (not both), and every call its tool result before the next assistant message; the last
  message must be a user (or system, or tool) message unless the assistant's answer is being
  continued or the conversation is a finished record;
- system messages are removed and their contents joined with "\n\n" into one system prompt;
  consecutive messages of one role are merged (contents joined with "\n\n", empty ones skipped; tool
  results never);
  a conversation not starting with a user message gets an empty user message in front;
- tokens: BOS, then per message
    v1 user:      encode("[INST] {content} [/INST]"), the system prompt + "\n\n" in front of the
                  content of the FIRST user message;
    v3 user:      [INST] encode(content) [/INST] with control tokens, the system prompt + "\n\n" in
                  front of the content of the LAST user message;
    assistant:    encode(content) + EOS (v3 strips trailing spaces first); no EOS when continued.
  Tools, tool calls and tool results in v3 are written as tools.py describes.
  `encode` is SentencePiece's plain encode (dummy prefix, no special-token parsing).

Jinja templates are rendered the way transformers' `apply_chat_template` renders them: a sandboxed
environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, a `tojson` that
does not escape HTML, `strftime_now`, and the special tokens as variables (bos_token, eos_token, ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from mlx_mixtral.errors import ChatTemplateError
from mlx_mixtral.tokenizer.tools import (
    TOOL_CALLS_TOKEN,
    available_tools_json,
    check_tool_calls,
    mistral_calls_json,
    mistral_result_json,
)

MISTRAL_V1, MISTRAL_V3, JINJA = "mistral-v1", "mistral-v3", "jinja"
_ROLES = ("system", "user", "assistant", "tool")
# mistral-common's allowed successor roles (validator._validate_message_order).
_NEXT_ROLES = {
    "system": {"system", "user", "assistant"},
    "user": {"user", "assistant", "system"},
    "assistant": {"assistant", "user", "tool"},
    "tool": {"assistant", "tool", "user"},
}
_JOIN = "\n\n"


@dataclass
class Turn:
    """One message as the Mistral formats see it (tool messages and calls only in v3)."""

    role: str
    text: str
    calls: list[dict] = field(default_factory=list)  # an assistant's tool calls: {"id", "name", "arguments"}
    call_id: str = ""  # a tool message's tool_call_id


def content_text(content: object, index: int) -> str:
    """The text of message `index`'s content: a string, or a list of OpenAI-style text parts
    ({"type": "text", "text": ...}) joined as mistral-common joins text chunks: non-empty parts
    with a blank line between them. The one rule for every chat format and every caller."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatTemplateError(f"message {index}: only text content parts are supported, got {part!r:.80}")
            if part["text"]:
                parts.append(part["text"])
        return _JOIN.join(parts)
    raise ChatTemplateError(
        f"message {index}: content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _check(messages: Sequence[Mapping], *, final_assistant: bool, tools_allowed: bool) -> list[Turn]:
    """Validate like mistral-common and return the turns."""
    if not messages:
        raise ChatTemplateError("the conversation is empty: expected at least one message")
    turns: list[Turn] = []
    pending = 0  # tool results still expected for the latest assistant's calls
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in _ROLES or (role == "tool" and not tools_allowed):
            roles = _ROLES if tools_allowed else _ROLES[:3]
            raise ChatTemplateError(
                f"message {i}: role {role!r} is not supported by the Mistral format "
                f"(expected one of {', '.join(roles)})"
            )
        if turns and role not in _NEXT_ROLES[turns[-1].role]:
            raise ChatTemplateError(f"message {i}: role {role!r} cannot follow role {turns[-1].role!r}")
        if role == "system" and message.get("content") is None:
            raise ChatTemplateError(f"message {i}: system message has no content")
        turn = Turn(role, content_text(message.get("content"), i))
        if role == "assistant" and message.get("tool_calls"):
            if not tools_allowed:
                raise ChatTemplateError(f"message {i}: tool calls need a format with tools (mistral-v3)")
            turn.calls = check_tool_calls(message["tool_calls"], i)
            if turn.text:
                raise ChatTemplateError(f"message {i}: an assistant message has either content or tool_calls, not both")
        if role == "assistant" and not turn.text and not turn.calls:
            raise ChatTemplateError(f"message {i}: assistant message has no content")
        if role == "tool":
            turn.call_id = message.get("tool_call_id") or ""
            if not isinstance(turn.call_id, str) or not turn.call_id:
                raise ChatTemplateError(f"message {i}: a tool message needs the tool_call_id it answers")
        if role == "assistant":
            if pending:
                raise ChatTemplateError(f"message {i}: {pending} tool call(s) before it have no tool result")
            pending = len(turn.calls)
        elif role == "tool":
            pending -= 1
        turns.append(turn)
    if len(turns) == 1 and turns[0].role not in ("user", "system"):
        raise ChatTemplateError("message 0: a conversation of one message must start with a user or system message")
    if turns[-1].role == "assistant" and not final_assistant and len(turns) > 1:
        raise ChatTemplateError(
            "the last message is an assistant message: a prompt for a new answer must end with a "
            "user message (pass add_generation_prompt=False to encode a finished conversation, or "
            "continue_final_message=True to continue that answer)"
        )
    return turns


def _normalize(turns: list[Turn]) -> tuple[str | None, list[Turn]]:
    """System prompt out, same-role runs merged (tool results never), an empty user message first if needed."""
    system = [t.text for t in turns if t.role == "system" and t.text]
    merged: list[tuple[str, list[Turn]]] = []
    previous = None
    for turn in turns:
        if turn.role != "system":
            if turn.role == previous and turn.role != "tool":
                merged[-1][1].append(turn)
            else:
                merged.append((turn.role, [turn]))
        previous = turn.role  # a system message ends a run even though it is dropped
    out = []
    for role, run in merged:
        text = _JOIN.join(t.text for t in run if t.text)
        calls = [c for t in run for c in t.calls]
        if text and calls:
            raise ChatTemplateError("consecutive assistant messages mix content and tool_calls")
        out.append(Turn(role, text, calls, run[0].call_id))
    if not out or out[0].role != "user":
        out.insert(0, Turn("user", ""))
    return (_JOIN.join(system) if system else None), out


def encode_mistral(
    messages: Sequence[Mapping],
    *,
    version: str,
    encode: Callable[[str], list[int]],
    bos_id: int,
    eos_id: int,
    control_ids: Mapping[str, int] | None = None,
    tools: Sequence[Mapping] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Token ids of a conversation in Mistral's instruct format v1 or v3 (see the module docstring);
    `control_ids` maps v3's control tokens ([INST], [TOOL_CALLS], ...) to their ids."""
    if continue_final_message and (not messages or (messages[-1] or {}).get("role") != "assistant"):
        raise ChatTemplateError("continue_final_message=True needs an assistant message last")
    control = dict(control_ids or {})
    if version == MISTRAL_V3 and not {"[INST]", "[/INST]"} <= control.keys():
        raise ChatTemplateError(
            "the mistral-v3 format needs the [INST] and [/INST] control tokens, which this tokenizer does not have"
        )
    has_tools = version == MISTRAL_V3 and TOOL_CALLS_TOKEN in control
    turns = _check(
        messages, final_assistant=continue_final_message or not add_generation_prompt, tools_allowed=has_tools
    )
    system, turns = _normalize(turns)
    users = [i for i, turn in enumerate(turns) if turn.role == "user"]
    ids = [bos_id]
    for i, turn in enumerate(turns):
        text = turn.text
        if turn.role == "user":
            if version == MISTRAL_V1:
                if system and i == users[0]:
                    text = system + _JOIN + text
                ids += encode(f"[INST] {text} [/INST]")
            else:
                if i == users[-1]:
                    if tools:
                        ids += [control["[AVAILABLE_TOOLS]"], *encode(available_tools_json(tools))]
                        ids.append(control["[/AVAILABLE_TOOLS]"])
                    if system:
                        text = system + _JOIN + text
                ids += [control["[INST]"], *encode(text), control["[/INST]"]]
        elif turn.role == "tool":
            result = mistral_result_json(text, turn.call_id)
            ids += [control["[TOOL_RESULTS]"], *encode(result), control["[/TOOL_RESULTS]"]]
        else:
            if turn.calls:
                ids += [control[TOOL_CALLS_TOKEN], *encode(mistral_calls_json(turn.calls))]
            else:
                ids += encode(text if version == MISTRAL_V1 else text.rstrip(" "))
            if not (continue_final_message and i == len(turns) - 1):
                ids.append(eos_id)
    return ids


# --- Jinja ----------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # marks where a continued answer ends, then is cut off


def render_jinja(
    source: str,
    messages: Sequence[Mapping],
    *,
    special_tokens: Mapping[str, str],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    **variables,
) -> str:
    """The prompt text a Jinja chat template makes of a conversation."""
    import jinja2

    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
    # Keys set to None are dropped, as transformers does (templates test `'key' in message`).
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    for i, m in enumerate(chat):
        if isinstance(m.get("content"), list):  # text parts become one text, as for the Mistral formats
            m["content"] = content_text(m["content"], i)
    final = None
    if continue_final_message:
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ChatTemplateError("continue_final_message=True needs a last message with string content")
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    template = _compile(source)
    try:
        # transformers always passes tools and documents (None unless given) next to the special tokens.
        text = template.render(
            messages=chat,
            add_generation_prompt=add_generation_prompt,
            **{"tools": None, "documents": None, **special_tokens, **variables},
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError("chat template: " + " ".join(str(e).split())) from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError) as e:
        # A template is a program: what its own code raises ({{ 1/0 }}, a missing key) is its fault.
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError("continue_final_message=True but the chat template dropped the final message")
        cut = text.rindex(tag)
        # Keep the answer exactly as given; a template that trims the message loses its trailing space.
        text = text[:cut] if text[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:cut].rstrip()
    return text
