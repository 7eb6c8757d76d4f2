"""Constrained decoding: a grammar (a JSON schema, or a tool-call format) decides which tokens may come next.

Shapes: T tokens seen so far, V vocab, W = ceil(V / 32) mask words.

The engine is llguidance (Microsoft's Rust grammar engine behind Guidance, also used by vLLM,
SGLang and llama.cpp): JSON schemas and Lark grammars compile in about a millisecond, and it
refuses a schema keyword it cannot enforce instead of ignoring it. It needs only the tokenizer's
byte strings; special tokens are written as 0xFF followed by their text, llguidance's convention.

`GrammarConstraint` is a logits processor `(tokens (T,), logits (1, V)) -> logits` with the grammar's
state for one generation: each call feeds the tokens sampled since the previous call to the
matcher, then sets every logit the grammar forbids to -inf. It first queues the forward pass that
produced `logits` (`mx.async_eval`) and only then waits for the previous token and computes the mask
on the host, so the mask is computed while the device runs the step; only sampling waits for it.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from mlx_mixtral.errors import SchemaError

if TYPE_CHECKING:  # the tokenizer's tool formats use check_schema from here
    from mlx_mixtral.tokenizer.core import Tokenizer

# The JSON the grammar writes: json.dumps' default separators, no free whitespace (a model that may
# pad with whitespace forever never finishes; these separators are the ones Mistral's formats use).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_vocabularies: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()


class _TokenizerView:
    """What llguidance.TokenizerWrapper reads: each token's bytes, the special ids, EOS, and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        special = tokenizer.special_ids
        self.tokens = [
            b"\xff" + tokenizer.token_bytes(i) if i in special else tokenizer.token_bytes(i)
            for i in range(tokenizer.vocab_size)
        ]
        self.special_token_ids = sorted(special)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self._encode = tokenizer.encode_fragment

    def __call__(self, text: bytes) -> list[int]:
        return self._encode(text.decode("utf-8", errors="replace"))


def grammar_vocabulary(tokenizer: Tokenizer):
    """The llguidance tokenizer of `tokenizer` (built once, ~0.2 s for a 32k vocabulary)."""
    if tokenizer not in _vocabularies:
        import llguidance

        _vocabularies[tokenizer] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer)))
    return _vocabularies[tokenizer]


def check_schema(schema: Any, what: str = "json_schema") -> dict[str, Any]:
    """`schema` if it is a JSON Schema (a dict that the 2020-12 metaschema accepts), else SchemaError."""
    import jsonschema

    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise SchemaError(f"{what}: expected a JSON Schema object, got {type(schema).__name__}", option=what)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise SchemaError(f"{what} is not a valid JSON Schema at {where}: {e.message}", option=what) from None
    return dict(schema)


def json_grammar(schema: Mapping[str, Any]) -> str:
    """A Lark rule body holding one JSON value to `schema`."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def lark(start: str, rules: Mapping[str, str] | None = None) -> str:
    """A Lark grammar: `start` and the named rules (their bodies as Lark text)."""
    lines = [f"start: {start}"] + [f"{name}: {body}" for name, body in (rules or {}).items()]
    return "\n".join(lines) + "\n"


class GrammarConstraint:
    """One generation's grammar state as a logits processor (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, grammar: str):
        import llguidance

        vocab = grammar_vocabulary(tokenizer)
        self.matcher = llguidance.LLMatcher(vocab, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        if self.matcher.is_error():
            raise SchemaError(f"grammar: {self.matcher.get_error()}")
        self.vocab_size = tokenizer.vocab_size
        self._words = np.zeros((self.vocab_size + 31) // 32, np.int32)  # (W,) bit i of word w: token 32w + i
        self._seen: int | None = None  # tokens already fed to the matcher (the prompt's length at first)
        self._bits: tuple[mx.array, mx.array] | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # the forward pass runs while the host works out the mask below
        if self._seen is None:
            self._seen = tokens.size  # the prompt: the grammar starts after it
        elif tokens.size > self._seen:
            for token in tokens[self._seen :].tolist():  # waits for the previous token only
                if not self.matcher.consume_token(int(token)):
                    raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
            self._seen = tokens.size
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        return mx.where(self._allowed(logits.shape[-1]), logits, mx.array(-mx.inf, logits.dtype))

    def _allowed(self, vocab: int) -> mx.array:
        """(V,) bool: the mask words unpacked on the device (a token beyond the tokenizer's vocabulary
        is never allowed)."""
        if self._bits is None or self._bits[0].size != vocab:
            ids = mx.arange(vocab, dtype=mx.uint32)  # (V,)
            self._bits = (mx.minimum(ids // 32, self._words.size - 1), ids % 32)
        word, bit = self._bits
        words = mx.array(self._words.view(np.uint32))  # (W,)
        allowed = (mx.take(words, word) >> bit) & 1  # (V,)
        if vocab > self.vocab_size:
            allowed = mx.where(mx.arange(vocab) < self.vocab_size, allowed, 0)
        return allowed.astype(mx.bool_)

    @property
    def finished(self) -> bool:
        """The grammar is complete (only end-of-sequence may follow)."""
        return self.matcher.is_stopped() or self.matcher.is_accepting()


# --- what a generation is held to ------------------------------------------------------------------


def check_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> str | None:
    """OpenAI's tool_choice (or a tool's name) -> "auto", "none", "required" or the one function's name
    (SchemaError otherwise)."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not tools:
            raise SchemaError("tool_choice is 'required' but no tools are given", option="tool_choice")
        return tool_choice
    names = [t["function"]["name"] for t in tools]
    if isinstance(tool_choice, str) and tool_choice in names:  # the checked form, a function's name
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or tool_choice.get("type", "function") != "function":
        raise SchemaError(
            f'tool_choice must be "auto", "none", "required" or {{"type": "function", "function": {{"name": ...}}}}, '
            f"got {json.dumps(tool_choice)[:80]}",
            option="tool_choice",
        )
    if name not in names:
        raise SchemaError(
            f"tool_choice names the function {name!r}, which is not among the tools ({', '.join(names) or 'none'})",
            option="tool_choice",
        )
    return name


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    # No parameters means a function without arguments: exactly {}.
    arguments = function["parameters"] or {"type": "object", "properties": {}, "additionalProperties": False}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _calls_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    schemas = [_call_schema(t) for t in tools]
    items = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def constraint_grammar(
    *,
    json_schema: Mapping[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str = "none",
    parallel_tool_calls: bool = True,
    tool_format: str = "generic",
    tool_calls_id: int | None = None,
) -> str | None:
    """The Lark grammar an answer is held to, or None when it is free.

    json_schema alone: one JSON value to it. With tools (tool_choice not "none"), in the tool format:
      generic: {"tool_calls": [calls]} or (auto only) {"response": text, or the json_schema value};
      mistral: [TOOL_CALLS] then the JSON list of calls, or (auto only) free text (or the json_schema value).
    "required" or a function's name: calls only (of that function only, when named)."""
    if tool_choice not in ("auto", "required"):
        tools = [t for t in tools or [] if t["function"]["name"] == tool_choice]
    if tool_choice == "none" or not tools:
        return lark(json_grammar(json_schema)) if json_schema is not None else None
    calls = _calls_schema(tools, parallel_tool_calls)
    if tool_format == "mistral":
        rules = {"calls": f'<[{tool_calls_id}]> " " {json_grammar(calls)}'}
        if tool_choice != "auto":
            return lark("calls", rules)
        rules["answer"] = json_grammar(json_schema) if json_schema is not None else "/(?s:.*)/"
        return lark("calls | answer", rules)
    object_of = {"type": "object", "required": None, "additionalProperties": False}
    call_object = {**object_of, "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
    if tool_choice != "auto":
        return lark(json_grammar(call_object))
    response = {**object_of, "properties": {"response": json_schema or {"type": "string"}}, "required": ["response"]}
    return lark(json_grammar({"anyOf": [call_object, response]}))


def check_constraint(grammar: str | None, what: str) -> None:
    """SchemaError when llguidance cannot enforce `grammar` (checked without a tokenizer)."""
    import llguidance

    if grammar is None:
        return
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar)
    )
    if is_error:
        reason = " ".join(" ".join(messages).split())
        raise SchemaError(f"{what} cannot be enforced by constrained decoding: {reason}", option=what)


def check_structured(
    *,
    json_schema: Any = None,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool = True,
) -> dict[str, Any]:
    """The structured-output options checked (SchemaError names the first problem): json_schema a
    JSON Schema llguidance can enforce, tools OpenAI tool definitions whose parameters it can
    enforce, tool_choice one of them. Returned as stream_generate takes them."""
    from mlx_mixtral.tokenizer.tools import check_tools

    schema = None if json_schema is None else check_schema(json_schema)
    checked = check_tools(tools) if tools else []
    choice = check_tool_choice(tool_choice, checked)
    check_constraint(constraint_grammar(json_schema=schema), "json_schema")
    if choice != "none":
        grammar = constraint_grammar(tools=checked, tool_choice=choice, parallel_tool_calls=bool(parallel_tool_calls))
        check_constraint(grammar, "tools")
    return dict(
        json_schema=schema, tools=checked or None, tool_choice=choice, parallel_tool_calls=bool(parallel_tool_calls)
    )


def make_constraint(
    tokenizer: Tokenizer,
    *,
    json_schema: Mapping[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: str,
    parallel_tool_calls: bool,
    tool_format: str,
) -> GrammarConstraint | None:
    """The grammar state for one generation with these (checked) options, or None when free."""
    grammar = constraint_grammar(
        json_schema=json_schema,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        tool_format=tool_format,
        tool_calls_id=tokenizer.tool_calls_id,
    )
    return None if grammar is None else GrammarConstraint(tokenizer, grammar)
