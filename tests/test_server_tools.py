"""Tools and structured output through the live server with the `openai` client: the tool round
trip (request -> tool_calls -> tool result -> answer), streamed and not, in the generic format (v1
model) and Mistral's (v3 model); response_format; 400s for what constrained decoding cannot do."""

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import httpx
import jsonschema
import pytest
from helpers.server_harness import LiveServer, shared
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint
from helpers.tools import TIME, WEATHER
from openai import BadRequestError, OpenAI

_servers: dict[str, LiveServer] = {}


def server(version: str) -> LiveServer:
    if version == "v1":
        return shared("server")
    if version not in _servers:
        root = Path(tempfile.mkdtemp(prefix="mlx_mixtral_tools_"))
        atexit.register(shutil.rmtree, root, True)
        make_hf_checkpoint(root / "m", vocab_size=32768, max_position_embeddings=2048)
        _servers[version] = LiveServer(add_tokenizer(root / "m", "v3"))
        atexit.register(_servers[version].stop)
    return _servers[version]


class Client:
    """The openai client for one server, with its served model id filled in."""

    def __init__(self, version: str):
        self.api = OpenAI(base_url=server(version).url + "/v1", api_key="unused", max_retries=0)
        self.model = server(version).health()["model"]

    def create(self, **kwargs):
        return self.api.chat.completions.create(model=self.model, **kwargs)


def client(version: str) -> Client:
    return Client(version)


def _collect(stream) -> tuple[str, list[dict], str]:
    """Content, tool calls and finish reason put together from streamed deltas."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert call["id"] is None and not call["arguments"], "id and name come first, once"
                call["id"], call["name"] = d.id, d.function.name
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _check_calls(calls: list[dict]) -> None:
    for call in calls:
        assert len(call["id"]) == 9 and call["id"].isalnum()
        tool = {"get_weather": WEATHER, "now": TIME}[call["name"]]
        jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"] or {"maxProperties": 0})


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_tool_round_trip_streamed_and_not(version):
    api = client(version)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    ask = dict(messages=messages, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=120)
    ask["parallel_tool_calls"] = False  # greedy decoding of a random model could list calls until max_tokens
    whole = api.create(**ask)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls
    ]
    _check_calls(calls)

    content, streamed, finish = _collect(api.create(stream=True, **ask))
    assert finish == "tool_calls" and content == ""
    _check_calls(streamed)
    # Same greedy answer both ways: the same calls (ids are fresh per answer).
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c["name"], c["arguments"]) for c in calls]

    # The client runs the tools and sends the results back; the model then answers.
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ],
    }
    results = [{"role": "tool", "tool_call_id": c["id"], "name": c["name"], "content": '{"ok": true}'} for c in calls]
    follow = dict(messages=messages + [assistant, *results], tools=[WEATHER, TIME], temperature=0, max_tokens=24)
    answer = api.create(tool_choice="none", **follow)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str) and not answer.choices[0].message.tool_calls
    content, streamed_calls, finish = _collect(api.create(stream=True, tool_choice="none", **follow))
    assert (
        content == answer.choices[0].message.content
        and not streamed_calls
        and finish == answer.choices[0].finish_reason
    )
    # With tool_choice "auto" the answer is either calls (valid ones) or text, never broken JSON.
    auto = api.create(tool_choice="auto", **{**follow, "max_tokens": 200}).choices[0]
    if auto.finish_reason == "tool_calls":
        _check_calls(
            [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in auto.message.tool_calls]
        )
    else:
        assert isinstance(auto.message.content, str)


def test_named_tool_choice_calls_that_function():
    api = client("v1")
    r = api.create(
        messages=[{"role": "user", "content": "time?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=1.0,
        seed=3,
        max_tokens=120,
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_weather"]
    _check_calls([{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in calls])


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_validates(stream):
    api = client("v1")
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        ask = dict(
            messages=[{"role": "user", "content": "JSON please"}],
            response_format=fmt,
            temperature=1.0,
            seed=seed,
            max_tokens=100,
        )
        if stream:
            content, _, finish = _collect(api.create(stream=True, **ask))
        else:
            choice = api.create(**ask).choices[0]
            content, finish = choice.message.content, choice.finish_reason
        assert finish == "stop"
        jsonschema.validate(json.loads(content), SCHEMA)
    # json_object: an object; a random model may write one key until max_tokens, but never anything else.
    for seed in range(3):
        r = api.create(
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_object"},
            max_tokens=60,
            temperature=1.0,
            seed=seed,
        ).choices[0]
        assert r.message.content.startswith("{")
        if r.finish_reason == "stop":
            assert isinstance(json.loads(r.message.content), dict)


@pytest.mark.parametrize(
    "extra, param, match",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            "needs json_schema.schema",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not among the tools",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}},
                    }
                ]
            },
            "tools",
            "cannot be enforced",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "letters, digits"),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ],
)
def test_what_cannot_be_enforced_is_a_400_naming_it(extra, param, match):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(server("v1").url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and match in error["message"], error
    with pytest.raises(BadRequestError):
        client("v1").create(**body)


def test_bad_tool_messages_are_400s():
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}]}
    r = httpx.post(server("v3").url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "role 'tool' cannot follow role 'user'" in r.json()["error"]["message"]
