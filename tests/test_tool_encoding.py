"""Tools in the prompt: the v3 format token for token against mistral-common, the generic format,
and Jinja templates that take tools (rendered as transformers renders them)."""

import json
from functools import cache

import pytest
from helpers.tiny_models import mistral_tokenizer_path
from helpers.tokenizer_fixtures import loaded_tokenizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mixtral.errors import ChatTemplateError, SchemaError
from mlx_mixtral.tokenizer.tools import GENERIC, MISTRAL, mistral_call_id, new_call_id


def tool(name, description="", **properties):
    required = [k for k in properties if not k.startswith("opt_")]
    schema = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


WEATHER = tool("get_weather", "Current weather in a city", city={"type": "string"}, opt_unit={"enum": ["C", "F"]})
SEARCH = tool("web-search", "Söke im Netz 🔎", query={"type": "string"}, limit={"type": "integer", "minimum": 1})
NOW = {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {}}}


def U(content):  # noqa: N802
    return {"role": "user", "content": content}


def A(content):  # noqa: N802
    return {"role": "assistant", "content": content}


def S(content):  # noqa: N802
    return {"role": "system", "content": content}


def calls(*pairs):
    """An assistant message calling (id, name, arguments) ..."""
    out = []
    for call_id, name, arguments in pairs:
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
    return {"role": "assistant", "content": None, "tool_calls": out}


def result(call_id, content, name=None):
    return {"role": "tool", "tool_call_id": call_id, "content": content, **({"name": name} if name else {})}


# (tools, messages): several tools, calls, results, multi-turn, parallel calls.
CONVERSATIONS = [
    ([WEATHER], [U("Weather in Paris?")]),
    ([WEATHER, SEARCH], [S("Be brief."), U("Weather in Paris?")]),
    (
        [WEATHER],
        [U("Paris?"), calls(("abcDEF123", "get_weather", {"city": "Paris"})), result("abcDEF123", '{"t": 21}')],
    ),
    (
        [WEATHER, NOW],
        [
            U("Weather and time?"),
            calls(("aaaaaaaa1", "get_weather", {"city": "Oslo", "unit": "C"}), ("bbbbbbbb2", "now", {})),
            result("aaaaaaaa1", '{"temp": -3, "sky": "snow"}', "get_weather"),
            result("bbbbbbbb2", "09:41"),
        ],
    ),
    (
        [WEATHER, SEARCH],
        [
            S("You are a helpful agent."),
            U("Paris?"),
            calls(("id0000001", "get_weather", {"city": "Paris"})),
            result("id0000001", '{"t": 21}'),
            A("It is 21 degrees."),
            U("And search for croissants, 3 results"),
        ],
    ),
    (
        [SEARCH],
        [
            U("find ümlauts"),
            calls(("Z9Z9Z9Z9Z", "web-search", '{"query":   "ümlauts",  "limit": 2}')),
            result("Z9Z9Z9Z9Z", "plain text, not JSON"),
            A("Found some."),
            U("more"),
            calls(("Y8Y8Y8Y8Y", "web-search", {"query": "more ümlauts", "limit": 5})),
            result("Y8Y8Y8Y8Y", '["a", "b"]'),
        ],
    ),
    ([NOW], [U("time?"), calls(("t1t1t1t1t", "now", "")), result("t1t1t1t1t", ""), U("thanks"), U("and again?")]),
    ([WEATHER], [U("no tool needed"), A("Sure."), U("ok")]),
    (
        [WEATHER, SEARCH, NOW],
        [
            S("sys one"),
            U("three at once"),
            calls(("c00000001", "now", {}), ("c00000002", "get_weather", {"city": "Rome"})),
            result("c00000002", '{"t": 30}'),
            result("c00000001", '"noon"'),
            A("Done."),
            U("bye"),
            S("sys two"),
        ],
    ),
    ([WEATHER], [U("first"), calls(("q1w2e3r4t", "get_weather", "not json {")), result("q1w2e3r4t", "{}")]),
    (None, [U("history only"), calls(("h1h1h1h1h", "now", {})), result("h1h1h1h1h", "12:00"), U("what now?")]),
    (
        [WEATHER],
        [
            U("continue after a tool"),
            calls(("k1k1k1k1k", "get_weather", {"city": "Lima"})),
            result("k1k1k1k1k", "[1, 2]"),
        ],
    ),
]


@cache
def _mistral_common() -> MistralTokenizer:
    return MistralTokenizer.from_file(str(mistral_tokenizer_path("v3")))


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_v3_tools_match_mistral_common(index):
    tools, messages = CONVERSATIONS[index]
    expected = _mistral_common().encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens
    tok = loaded_tokenizer("v3")
    assert tok.tool_format() == MISTRAL
    assert tok.apply_chat_template(messages, tools=tools) == expected


def test_call_ids_become_what_mistral_common_requires():
    assert mistral_call_id("abcDEF123") == "abcDEF123"
    mapped = mistral_call_id("call_0123456789abcdef")
    assert len(mapped) == 9 and mapped.isalnum() and mapped == mistral_call_id("call_0123456789abcdef")
    assert mapped != mistral_call_id("call_0123456789abcdeg")
    fresh = new_call_id()
    assert len(fresh) == 9 and fresh.isalnum()
    # An OpenAI-style id is encoded as its mapped id, in the call and in the result alike.
    tok = loaded_tokenizer("v3")
    raw = [U("x"), calls(("call_abc", "now", {})), result("call_abc", "1")]
    fixed = [U("x"), calls((mapped_abc := mistral_call_id("call_abc"), "now", {})), result(mapped_abc, "1")]
    assert tok.apply_chat_template(raw, tools=[NOW]) == tok.apply_chat_template(fixed, tools=[NOW])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([U("a"), result("abcdefghi", "x")], "role 'tool' cannot follow role 'user'"),
        ([U("a"), calls(("abcdefghi", "now", {})), A("b")], "no tool result"),
        (
            [U("a"), {"role": "assistant", "content": "both", "tool_calls": calls(("a", "now", {}))["tool_calls"]}],
            "not both",
        ),
        ([U("a"), calls(("abcdefghi", "now", {})), {"role": "tool", "content": "x"}], "tool_call_id"),
        ([U("a"), calls(("abcdefghi", "bad name!", {}))], "function name"),
    ],
)
def test_bad_tool_conversations_are_one_line_errors(messages, match):
    with pytest.raises(ChatTemplateError, match=match) as err:
        loaded_tokenizer("v3").apply_chat_template(messages, tools=[NOW], add_generation_prompt=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "tools, match",
    [
        ([{"type": "function", "function": {"name": "has space"}}], "function.name"),
        ([NOW, NOW], "two tools"),
        ([{"type": "retrieval"}], "tools\\[0\\]"),
        ([tool("f", x={"type": "strin"})], "not a valid JSON Schema"),
    ],
)
def test_bad_tool_definitions_are_schema_errors(tools, match):
    with pytest.raises(SchemaError, match=match):
        loaded_tokenizer("v3").apply_chat_template([U("a")], tools=tools)


def test_generic_format_on_v1_is_the_documented_conversation():
    """v1 has no tool tokens: the tools go into a system message and calls/results become JSON text,
    encoded exactly as mistral-common encodes that plain conversation."""
    tok = loaded_tokenizer("v1")
    assert tok.tool_format() == GENERIC
    messages = [
        S("Be brief."),
        U("Weather in Paris?"),
        calls(("abcDEF123", "get_weather", {"city": "Paris"})),
        result("abcDEF123", '{"t": 21}', "get_weather"),
        A("21 degrees."),
        U("Thanks"),
    ]
    instructions = (
        "You can call tools. Answer with one JSON object and nothing else: "
        '{"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}]} to call one or more tools, '
        'or {"response": <your answer>} to answer the user directly. A tool\'s result comes back as '
        '{"tool_response": {"tool": <tool name>, "tool_call_id": <id>, "content": <result>}}.\n\n'
        "Tools:\n" + json.dumps([WEATHER], ensure_ascii=False)
    )
    plain = [
        S(instructions),
        S("Be brief."),
        U("Weather in Paris?"),
        A('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]}'),
        U('{"tool_response": {"tool": "get_weather", "tool_call_id": "abcDEF123", "content": {"t": 21}}}'),
        A('{"response": "21 degrees."}'),
        U("Thanks"),
    ]
    expected = MistralTokenizer.from_file(str(mistral_tokenizer_path("v1")))
    expected = expected.encode_chat_completion(ChatCompletionRequest(messages=plain)).tokens
    assert tok.apply_chat_template(messages, tools=[WEATHER]) == expected


MISTRAL_TOOLS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}{% if loop.last and tools %}"
    "[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST] {{ m.content }}[/INST]"
    "{% elif m.tool_calls %}"
    "[TOOL_CALLS] {{ m.tool_calls | map(attribute='function') | list | tojson }}{{ eos_token }}"
    "{% elif m.role == 'tool' %}"
    "[TOOL_RESULTS] {{ {'content': m.content, 'call_id': m.tool_call_id} | tojson }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)


def test_jinja_template_that_takes_tools_renders_as_transformers():
    """A Jinja template reading `tools` gets them (and call arguments as values), as transformers'
    apply_chat_template passes them; its text is the same as transformers renders."""
    import tempfile
    from pathlib import Path

    from helpers.tokenizer_fixtures import hf_tokenizer, tokenizer_config, write_sp_dir

    from mlx_mixtral.tokenizer import load_tokenizer

    d = write_sp_dir(Path(tempfile.mkdtemp()) / "t", "v3", tokenizer_config("v3", chat_template=MISTRAL_TOOLS_TEMPLATE))
    ours = load_tokenizer(d)
    assert ours.tool_format() == MISTRAL
    messages = [U("Paris?"), calls(("abcDEF123", "get_weather", {"city": "Paris"})), result("abcDEF123", "21")]
    theirs = hf_tokenizer(str(d))
    hf_messages = [dict(m) for m in messages]
    hf_messages[1] = {
        "role": "assistant",
        "tool_calls": [
            {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    }
    text = theirs.apply_chat_template(hf_messages, tools=[WEATHER], tokenize=False)
    assert ours.render_chat_template(messages, tools=[WEATHER]) == text
    assert ours.apply_chat_template(messages, tools=[WEATHER]) == ours.encode(text, add_special_tokens=False)
