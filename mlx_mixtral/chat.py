"""Multi-turn chat that keeps the KV cache between turns.

Each turn renders the whole conversation with the chat template, finds how much of it the cache
already holds (the longest common prefix of token ids), trims the cache back to that prefix if
the two disagree, and prefills only the rest. With the Mistral templates the new conversation
extends the previous one, so turn N prefills just its own tokens; when a template rewrites
history (mistral-common v3 moves the system prompt into the last user message) the prefix is
shorter and more is recomputed, but the model always sees exactly what the template says.

Context limit: with the default unbounded cache a turn that does not fit in the model's context
(`max_position_embeddings`, or `context_length`) raises `ContextLimitError` and leaves the
session unchanged, and answers are cut ("length") where the context ends. With `max_kv_size=W`
the cache keeps the newest W tokens and attention becomes a sliding window of W tokens, so the
chat never runs out of room but forgets what fell out of the window.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlx_mixtral.cache import Cache, kv_dims, load_prompt_cache, save_prompt_cache
from mlx_mixtral.errors import CacheFileError
from mlx_mixtral.generate import GenerationResponse, stream_generate
from mlx_mixtral.language_model import LanguageModel
from mlx_mixtral.options import DEFAULT_MAX_TOKENS, fit_to_context
from mlx_mixtral.text import clean_json
from mlx_mixtral.tokenizer.core import Tokenizer

SESSION_FORMAT = "mlx-mixtral-chat/1"


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def held_ids(cache: list[Cache], fed: list[int]) -> list[int] | None:
    """The ids `cache` holds after `fed` (prompt + generated ids) went through it: a prefix of `fed`,
    since the decode loop may or may not have fed the last token. None when layers disagree (a forward
    pass interrupted halfway), i.e. the cache is unusable."""
    offsets = {layer.offset for layer in cache}
    if len(offsets) != 1:
        return None
    offset = offsets.pop()
    return fed[:offset] if offset <= len(fed) else None


def reuse_cache(cache: list[Cache], cached_ids: list[int], ids: list[int]) -> int:
    """Trim `cache` (which holds `cached_ids`) to its longest prefix shared with `ids`; return
    how many leading ids it still holds, or -1 when it cannot be trimmed that far (a rotating
    cache that has dropped the keys the shorter prefix needs) and must be rebuilt. At least
    the last id of `ids` is always left to prefill, since its logits start the answer."""
    keep = min(common_prefix_length(cached_ids, ids), len(ids) - 1)
    drop = len(cached_ids) - keep
    if drop and any(layer.trimmable() < drop for layer in cache):
        return -1
    for layer in cache:
        layer.trim(drop)
    return keep


class ChatSession:
    """A conversation with a model; `send` streams the answer to one user message.

    Generation options given here (temperature, top_p, max_tokens, stop, ..., tools, tool_choice,
    json_schema) are the defaults for every turn; keyword arguments to `send`/`stream` override them
    for one turn. With `tools`, an answer that calls tools is kept as an assistant message with
    `tool_calls` (`chat.last.tool_calls`); `add_tool_result(call_id, content)` records each result and
    `send(None)` lets the model answer from them.
    """

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        max_kv_size: int | None = None,
        context_length: int | None = None,
        chat_template: str | None = None,
        **options: Any,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.max_kv_size = max_kv_size
        self.context_length = context_length or model.args.max_position_embeddings
        self.chat_template = chat_template
        self.options = options
        self.last: GenerationResponse | None = None  # the final response of the latest turn
        self.reset()

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and, if given, set a new system prompt)."""
        if system is not None:
            self.system = system
        self.messages: list[dict[str, str]] = []
        self.cache = self.model.make_cache(self.max_kv_size)
        self.cached_ids: list[int] = []  # the ids whose keys/values `cache` holds, in order

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template sees them, system prompt first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def add_tool_result(self, call_id: str, content: str, name: str | None = None) -> None:
        """The result of the tool call `call_id` (from `last.tool_calls`), for the next `send(None)`."""
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": content, "name": name})

    def send(self, text: str | None, **options: Any) -> Iterator[str]:
        """Stream the answer to `text` as text pieces."""
        for response in self.stream(text, **options):
            if response.text:
                yield response.text

    def stream(self, text: str | None, **options: Any) -> Iterator[GenerationResponse]:
        """Stream the answer to `text` (None: to the tool results just added) as `GenerationResponse`s
        (`prompt_tokens` counts only the tokens prefilled for this turn). Closing the stream early
        keeps the partial answer."""
        options = {**self.options, **options}
        turn = [] if text is None else [{"role": "user", "content": text}]
        messages = self.conversation() + turn
        tools = options.get("tools") if options.get("tool_choice") != "none" else None
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, template=self.chat_template, tools=tools
        )
        if tools:
            options.setdefault("tool_format", self.tokenizer.tool_format(self.chat_template))
        if self.max_kv_size is None:  # a sliding window never runs out of room
            options["max_tokens"] = fit_to_context(
                len(ids),
                options.get("max_tokens", DEFAULT_MAX_TOKENS),
                self.context_length,
                hint="reset the chat, or start it with max_kv_size=N to keep a sliding window of N tokens",
            )

        kept = reuse_cache(self.cache, self.cached_ids, ids)
        if kept < 0:
            self.cache, kept = self.model.make_cache(self.max_kv_size), 0
        self.cached_ids = ids[:kept]
        self.messages += turn
        pieces: list[str] = []
        tokens: list[int] = []
        try:
            for response in stream_generate(
                self.model, self.tokenizer, ids[kept:], cache=self.cache, context=ids[:kept], **options
            ):
                pieces.append(response.text)
                tokens.append(response.token)
                self.last = response
                yield response
        finally:
            if tokens and self.last is not None and self.last.tool_calls:
                self.messages.append({"role": "assistant", "content": None, "tool_calls": self.last.tool_calls})
            elif tokens:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            elif turn:  # failed or stopped before the first token: the turn did not happen
                self.messages.pop()
            self._sync_cached_ids(ids + tokens)

    def _sync_cached_ids(self, fed: list[int]) -> None:
        """Record what the cache holds after a turn; a cache left unusable by an interrupted
        forward pass is dropped and rebuilt next turn."""
        held = held_ids(self.cache, fed)
        if held is None:
            self.cache, held = self.model.make_cache(self.max_kv_size), []
        self.cached_ids = held

    def save(self, path: str | Path) -> None:
        """Write the messages and the KV cache to one safetensors file."""
        if not self.cached_ids:
            raise CacheFileError("nothing to save: the chat has no turns yet")
        meta = {
            "format": SESSION_FORMAT,
            "system": json.dumps(self.system),
            "messages": json.dumps(self.messages),
            "token_ids": json.dumps(self.cached_ids),
            "max_kv_size": json.dumps(self.max_kv_size),
        }
        save_prompt_cache(path, self.cache, meta)

    @classmethod
    def load(cls, path: str | Path, model: LanguageModel, tokenizer: Tokenizer, **kwargs: Any) -> ChatSession:
        """A session saved by `save`, continuing exactly where it stopped, on the same model."""
        cache, meta = load_prompt_cache(path, what="saved chat")
        if meta.get("format") != SESSION_FORMAT:
            raise CacheFileError(
                f"{path}: not a saved chat session (format {meta.get('format')!r}, expected {SESSION_FORMAT!r})"
            )
        try:  # text read from a file follows the one text rule (mlx_mixtral.text)
            saved = {
                key: clean_json(json.loads(meta[key])) for key in ("system", "messages", "token_ids", "max_kv_size")
            }
        except (KeyError, ValueError):
            raise CacheFileError(
                f"{path}: saved chat without readable system, messages, token_ids and max_kv_size"
            ) from None
        args = model.args
        dims = kv_dims(cache[0]) if cache else None
        if len(cache) != args.num_hidden_layers or dims != (args.num_key_value_heads, args.head_dim):
            got = "no layers" if dims is None else f"{len(cache)} layers of {dims[0]}x{dims[1]} keys"
            raise CacheFileError(
                f"{path}: saved for another model ({got}; this model has {args.num_hidden_layers} "
                f"layers of {args.num_key_value_heads}x{args.head_dim})"
            )
        kwargs.setdefault("system", saved["system"])
        kwargs.setdefault("max_kv_size", saved["max_kv_size"])
        session = cls(model, tokenizer, **kwargs)
        session.messages = saved["messages"]
        session.cache, session.cached_ids = cache, saved["token_ids"]
        return session
