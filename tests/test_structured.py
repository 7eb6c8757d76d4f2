"""Constrained decoding: every answer of a random-weight model validates (jsonschema), forced tool
calls carry valid arguments, the grammar processor matches a step-by-step reference, bad schemas
are one-line SchemaErrors, and tool-call text becomes OpenAI tool_calls (whole and streamed)."""

import json
import tempfile
from functools import cache
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from helpers.server_harness import make_chat_model
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint
from helpers.tools import TIME, WEATHER

from mlx_mixtral import load, stream_generate
from mlx_mixtral.errors import SchemaError
from mlx_mixtral.grammar import constraint_grammar, grammar_vocabulary
from mlx_mixtral.tool_calls import ToolCallStream

SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array with bounds": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 4}
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M"]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "numbers with ranges": {
        "type": "object",
        "properties": {
            "t": {"type": "number", "minimum": -10.5, "maximum": 40},
            "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9},
            "p": {"type": "integer", "minimum": 100, "maximum": 105},
        },
        "required": ["t", "n", "p"],
        "additionalProperties": False,
    },
    "optional fields": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": {"type": "null"},
            "c": {"type": "string", "maxLength": 5},
            "d": {"type": "integer", "minimum": 0, "maximum": 3},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "recursive list": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 9},
                    "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["v", "next"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
}
SEEDS = range(12)


@cache
def model_v(version: str):
    """A tiny random Mixtral with the real v1 (32000) or v3 (32768) tokenizer."""
    root = Path(tempfile.mkdtemp(prefix="mlx_mixtral_structured_"))
    if version == "v1":
        return load(str(make_chat_model(root / "m")))
    make_hf_checkpoint(root / "m", vocab_size=32768, max_position_embeddings=2048)
    return load(str(add_tokenizer(root / "m", "v3")))


def prompt(tok, tools=None):
    return tok.apply_chat_template([{"role": "user", "content": "Answer in JSON."}], tools=tools)


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sampled_answer_validates(name):
    model, tok = model_v("v1")
    schema = SCHEMAS[name]
    for seed in SEEDS:
        responses = list(
            stream_generate(model, tok, prompt(tok), max_tokens=400, temperature=1.0, seed=seed, json_schema=schema)
        )
        text = "".join(r.text for r in responses)
        assert responses[-1].finish_reason == "stop", (seed, text)
        jsonschema.validate(json.loads(text), schema)


def _reference_greedy(model, tok, ids, grammar, n):
    """Greedy decoding the slow way: the whole sequence through the model each step (no cache, no
    pipelining) and the mask from a separate llguidance matcher."""
    import llguidance

    matcher = llguidance.LLMatcher(grammar_vocabulary(tok), llguidance.LLMatcher.grammar_from_lark(grammar))
    out = []
    for _ in range(n):
        logits = np.array(model(mx.array([ids + out]))[0, -1].astype(mx.float32))
        allowed = np.frombuffer(matcher.compute_bitmask(), np.uint8)
        allowed = np.unpackbits(allowed, bitorder="little")[: tok.vocab_size].astype(bool)
        token = int(np.argmax(np.where(allowed[: logits.size], logits, -np.inf)))
        out.append(token)
        if token == tok.eos_token_id:
            break
        assert matcher.consume_token(token)
    return out


@pytest.mark.parametrize("name", ["nested objects", "numbers with ranges"])
def test_constrained_greedy_matches_a_step_by_step_reference(name):
    model, tok = model_v("v1")
    ids = prompt(tok)
    ours = [r.token for r in stream_generate(model, tok, ids, max_tokens=80, json_schema=SCHEMAS[name])]
    grammar = constraint_grammar(json_schema=SCHEMAS[name])
    assert ours == _reference_greedy(model, tok, ids, grammar, 80)


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_always_carry_valid_arguments(version, choice):
    model, tok = model_v(version)
    tools = [WEATHER, TIME]
    ids = prompt(tok, tools)
    for seed in SEEDS:
        last = list(
            stream_generate(
                model, tok, ids, max_tokens=300, temperature=1.0, seed=seed, tools=tools, tool_choice=choice
            )
        )[-1]
        assert last.finish_reason == "tool_calls" and last.tool_calls, seed
        for call in last.tool_calls:
            assert len(call["id"]) == 9 and call["id"].isalnum()
            name = call["function"]["name"]
            if isinstance(choice, dict):
                assert name == "get_weather"
            parameters = next(t for t in tools if t["function"]["name"] == name)["function"]["parameters"]
            arguments = json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, parameters or {"type": "object", "maxProperties": 0})


def test_v3_tool_calls_start_with_the_control_token():
    model, tok = model_v("v3")
    responses = list(
        stream_generate(model, tok, prompt(tok, [TIME]), max_tokens=50, tools=[TIME], tool_choice="required")
    )
    assert responses[0].token == tok.token_to_id("[TOOL_CALLS]")
    assert "".join(r.text for r in responses) == '[{"name": "now", "arguments": {}}]'


def test_parallel_tool_calls_false_allows_one_call():
    model, tok = model_v("v1")
    for seed in range(6):
        last = list(
            stream_generate(
                model,
                tok,
                prompt(tok, [TIME]),
                max_tokens=100,
                temperature=1.0,
                seed=seed,
                tools=[TIME],
                tool_choice="required",
                parallel_tool_calls=False,
            )
        )[-1]
        assert len(last.tool_calls) == 1


@pytest.mark.parametrize(
    "options, match",
    [
        ({"json_schema": {"type": "strin"}}, "not a valid JSON Schema"),
        ({"json_schema": {"type": "array", "uniqueItems": True}}, "cannot be enforced.*uniqueItems"),
        ({"json_schema": {"not": {"type": "string"}}}, "cannot be enforced"),
        ({"json_schema": "object"}, "expected a JSON Schema object"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tool_choice": "required"}, "no tools"),
    ],
)
def test_bad_structured_options_are_one_line_schema_errors(options, match):
    model, tok = model_v("v1")
    with pytest.raises(SchemaError, match=match) as err:
        next(stream_generate(model, tok, [1, 2], max_tokens=2, **options))
    assert "\n" not in str(err.value)


# --- parsing -------------------------------------------------------------------------------------------


def _stream(fmt, text, first=100, step=2):
    s = ToolCallStream(fmt, tool_token=5)
    deltas = []
    for i in range(0, len(text), step):
        deltas += s.feed(first if i == 0 else 100, text[i : i + step])
    return deltas, s.finish()


CALLS_TEXT = (
    '[{"name": "get_weather", "arguments": {"city": "Pa\\"ris é", "n": [1, 2]}}, {"name": "now", "arguments": {}}]'
)


@pytest.mark.parametrize(
    "fmt, first, text", [("mistral", 5, CALLS_TEXT), ("generic", 100, '{"tool_calls": ' + CALLS_TEXT + "}")]
)
def test_streamed_tool_call_deltas_add_up_to_the_whole_answer(fmt, first, text):
    for step in (1, 3, 7):
        deltas, (content, calls) = _stream(fmt, text, first, step)
        assert content is None
        expected = json.loads(text) if fmt == "mistral" else json.loads(text)["tool_calls"]
        assert [c["function"]["name"] for c in calls] == [e["name"] for e in expected]
        assert [json.loads(c["function"]["arguments"]) for c in calls] == [e["arguments"] for e in expected]
        for index, call in enumerate(calls):
            mine = [d for d in deltas if d.index == index]
            assert mine[0].id == call["id"] and mine[0].name == call["function"]["name"]  # id and name first
            assert "".join(d.arguments for d in mine) == call["function"]["arguments"]
        assert not any(d.content for d in deltas)


def test_generic_response_streams_as_content():
    text = json.dumps({"response": 'Hi "there"\n\u00e9 \\ done 😀'})
    text_ascii = json.dumps({"response": 'Hi "there"\n\u00e9 \\ done 😀'}, ensure_ascii=True)
    for t in (text, text_ascii):
        for step in (1, 2, 5):
            deltas, (content, calls) = _stream("generic", t, step=step)
            assert calls is None and content == 'Hi "there"\n\u00e9 \\ done 😀'
            assert "".join(d.content for d in deltas) == content


@pytest.mark.parametrize(
    "fmt, first, text",
    [
        ("mistral", 100, "Just words, no call."),
        ("mistral", 5, '[{"name": "f", "argum'),  # cut off by max_tokens
        ("mistral", 5, "not json at all"),
        ("generic", 100, "plain text from an unconstrained model"),
        ("generic", 100, '{"tool_calls": [{"name": "f", "arguments": {"a": 1}'),
    ],
)
def test_malformed_tool_call_text_is_plain_content(fmt, first, text):
    _, (content, calls) = _stream(fmt, text, first)
    assert calls is None and content == text


def test_chat_session_with_tools_keeps_calls_and_results():
    from mlx_mixtral import ChatSession

    model, tok = model_v("v3")
    chat = ChatSession(model, tok, tools=[TIME], tool_choice="required", parallel_tool_calls=False, max_tokens=40)
    "".join(chat.send("What time is it?"))
    calls = chat.last.tool_calls
    assert chat.last.finish_reason == "tool_calls" and calls[0]["function"]["name"] == "now"
    assert chat.messages[-1] == {"role": "assistant", "content": None, "tool_calls": calls}
    chat.add_tool_result(calls[0]["id"], "12:00", name="now")
    answer = "".join(chat.send(None, tool_choice="none", max_tokens=8))
    assert chat.messages[-1] == {"role": "assistant", "content": answer}
    # The turn after the tool result prefilled only its own tokens: the cache held the rest.
    whole = tok.apply_chat_template(chat.messages[:-1], tools=None)
    assert chat.last.prompt_tokens < len(whole)
