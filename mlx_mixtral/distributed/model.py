"""What `generate`, `chat` and `serve --distributed` need: this rank's part of a model sharded over an
`mlx.launch` group, generation that every rank runs in lock step, and the followers' loop.

    dm = DistributedModel.start(args.model)         # on every rank
    if not dm.is_leader:
        return dm.follow()                          # ranks 1..N-1: mirror rank 0 until it closes
    for r in dm.stream_generate(prompt, max_tokens=64, temperature=0.7):
        print(r.text, end="")                       # rank 0 only: it talks to the user
    dm.close()                                      # releases the followers

Requests carry token ids and JSON-able options only. A request without a seed gets one chosen by
rank 0, so sampling draws the same tokens on every rank.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_mixtral.chat import ChatSession
from mlx_mixtral.distributed.group import barrier, check_same_model, follow, init_group, lead, release_followers
from mlx_mixtral.distributed.loader import load_sharded
from mlx_mixtral.distributed.sharding import shard_summary
from mlx_mixtral.errors import CacheFileError, OptionError
from mlx_mixtral.experts import kernel_choice
from mlx_mixtral.generate import GenerationResponse, prompt_ids, stream_generate
from mlx_mixtral.language_model import LanguageModel
from mlx_mixtral.loader import resolve_model_dir
from mlx_mixtral.prefix_cache import PrefixCache
from mlx_mixtral.tokenizer.core import Tokenizer

# Options that are Python objects (or live state) and cannot travel to the other ranks.
_LOCAL_ONLY = ("sampler", "logits_processors", "cache")


def _encode_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON: refuse Python objects; `logit_bias` as pairs (JSON object keys are strings)."""
    bad = [k for k in _LOCAL_ONLY if options.get(k) is not None]
    if bad:
        raise OptionError(f"option {bad[0]!r} cannot be used with --distributed (only JSON-able options travel)")
    options = dict(options)
    if options.get("logit_bias"):
        options["logit_bias"] = [[int(k), float(v)] for k, v in options["logit_bias"].items()]
    return options


def _seeded(options: dict[str, Any], default_seed: Any = None) -> dict[str, Any]:
    """Without a seed every rank would draw its own random key; rank 0 picks one for all."""
    if options.get("seed") is None and default_seed is None:
        options = {**options, "seed": int.from_bytes(os.urandom(4), "little")}
    return options


def _decode_options(options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    if options.get("logit_bias"):
        options["logit_bias"] = {int(k): v for k, v in options["logit_bias"]}
    return options


class DistributedModel:
    """One rank: its shard of the model, the tokenizer, and the requests every rank runs alike."""

    def __init__(self, group: mx.distributed.Group, model: LanguageModel, tokenizer: Tokenizer, model_dir: Path):
        self.group, self.model, self.tokenizer, self.model_dir = group, model, tokenizer, model_dir
        self.rank = group.rank()
        self._sessions: dict[int, ChatSession] = {}
        self._session_ids = itertools.count()
        self._prefix_caches: dict[int, PrefixCache] = {}
        self._handlers = {
            "generate": self._generate,
            "chat.open": self._chat_open,
            "chat.stream": self._chat_stream,
            "chat.reset": self._chat_reset,
            "prefix.open": self._prefix_open,
            "prefix.stream": self._prefix_stream,
        }

    @classmethod
    def start(
        cls, path_or_repo: str | Path, *, dtype: mx.Dtype | None = None, kernels: str | None = None
    ) -> DistributedModel:
        """Join the group, check every rank has the same model, load this rank's part of it."""
        from mlx_mixtral.tokenizer import load_tokenizer

        group = init_group()
        model_dir = resolve_model_dir(path_or_repo)
        check_same_model(group, model_dir)
        model = load_sharded(model_dir, group, dtype=dtype, kernels=kernel_choice(kernels))
        tokenizer = load_tokenizer(model_dir)
        # Ranks load at their own disks' speed; requests (which have time limits) start after the slowest.
        barrier(group, "waiting for every rank to load its part")
        return cls(group, model, tokenizer, model_dir)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def shard_summary(self) -> str:
        return shard_summary(self.model.shard_plan, self.rank)

    # --- rank 0 ---------------------------------------------------------------------------
    def stream_generate(self, prompt: str | Sequence[int] | mx.array, **options: Any) -> Iterator[GenerationResponse]:
        """`generate.stream_generate` on every rank; the responses come out on rank 0."""
        options.setdefault("continuation", isinstance(prompt, str))  # decided before the text becomes ids
        request = {
            "op": "generate",
            "prompt": prompt_ids(self.tokenizer, prompt),
            "options": _seeded(_encode_options(options)),
        }
        return lead(self.group, request, self._handlers, _token_or_none)

    def chat(self, **kwargs: Any) -> DistributedChat:
        """A `ChatSession` on every rank (same keyword arguments), driven from rank 0."""
        sid = next(self._session_ids)
        self._run({"op": "chat.open", "id": sid, "kwargs": _encode_options(kwargs)})
        return DistributedChat(self, sid)

    def prefix_cache(self, capacity: int, max_kv_size: int | None = None) -> DistributedPrefixCache:
        """A server's `PrefixCache` on every rank (each holds its own heads' keys and values)."""
        sid = next(self._session_ids)
        self._run({"op": "prefix.open", "id": sid, "capacity": capacity, "max_kv_size": max_kv_size})
        return DistributedPrefixCache(self, sid)

    def _run(self, request: dict[str, Any]) -> None:
        """A request that yields nothing (opening or resetting a session) on every rank."""
        for _ in lead(self.group, request, self._handlers):
            pass

    def close(self) -> None:
        """Rank 0 at the end: the followers return from `follow`."""
        if self.is_leader:
            release_followers(self.group)

    # --- ranks 1..N-1 ---------------------------------------------------------------------
    def follow(self) -> int:
        """Mirror rank 0's requests until it closes; returns an exit status.

        Under mlx.launch a Ctrl-C reaches every rank on the terminal's machine; only rank 0 acts on
        it (a chat stops the answer and tells the others), so followers ignore SIGINT."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        follow(self.group, self._handlers, _token_or_none)
        return 0

    # --- what every rank runs -------------------------------------------------------------
    def _generate(self, request: dict[str, Any]) -> Iterator[GenerationResponse]:
        return stream_generate(self.model, self.tokenizer, request["prompt"], **_decode_options(request["options"]))

    def _chat_open(self, request: dict[str, Any]) -> Iterator[None]:
        kwargs = _decode_options(request["kwargs"])
        self._sessions[request["id"]] = ChatSession(self.model, self.tokenizer, **kwargs)
        return iter(())

    def _chat_stream(self, request: dict[str, Any]) -> Iterator[GenerationResponse]:
        return self._sessions[request["id"]].stream(request["text"], **_decode_options(request["options"]))

    def _chat_reset(self, request: dict[str, Any]) -> Iterator[None]:
        self._sessions[request["id"]].reset(request["system"])
        return iter(())

    def _prefix_open(self, request: dict[str, Any]) -> Iterator[None]:
        max_kv_size = request["max_kv_size"]
        self._prefix_caches[request["id"]] = PrefixCache(
            lambda: self.model.make_cache(max_kv_size), request["capacity"]
        )
        return iter(())

    def _prefix_stream(self, request: dict[str, Any]) -> Iterator[GenerationResponse]:
        """The server's take / generate / put back (`PrefixCache.stream`); every rank makes the same choices."""
        prefix_cache = self._prefix_caches[request["id"]]
        return prefix_cache.stream(self.model, self.tokenizer, request["ids"], **_decode_options(request["options"]))


def _token_or_none(item: Any) -> int | None:
    return item.token if isinstance(item, GenerationResponse) else None


class DistributedChat:
    """Rank 0's handle on a chat session that every rank keeps: `stream`/`send`/`reset` run on every
    rank; reading attributes (`messages`, `last`, `conversation()`, ...) uses rank 0's copy."""

    def __init__(self, dm: DistributedModel, sid: int):
        self._dm, self._sid = dm, sid

    def stream(self, text: str, **options: Any) -> Iterator[GenerationResponse]:
        session_seed = self._dm._sessions[self._sid].options.get("seed")
        request = {
            "op": "chat.stream",
            "id": self._sid,
            "text": text,
            "options": _seeded(_encode_options(options), session_seed),
        }
        return lead(self._dm.group, request, self._dm._handlers, _token_or_none)

    send = ChatSession.send  # the text pieces of `stream` above

    def reset(self, system: str | None = None) -> None:
        self._dm._run({"op": "chat.reset", "id": self._sid, "system": system})

    def save(self, path: str | Path) -> None:
        raise CacheFileError(
            "saving a chat session is not supported with --distributed (each rank holds part of its KV cache)"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dm._sessions[self._sid], name)


class DistributedPrefixCache:
    """Rank 0's handle on a server prefix cache that every rank keeps (see `DistributedModel.prefix_cache`)."""

    def __init__(self, dm: DistributedModel, sid: int):
        self._dm, self._sid = dm, sid

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the latest `stream` found in the cache (known once it yielded once)."""
        return self._dm._prefix_caches[self._sid].cached_tokens

    def stream(self, ids: Sequence[int], **options: Any) -> Iterator[GenerationResponse]:
        request = {
            "op": "prefix.stream",
            "id": self._sid,
            "ids": [int(t) for t in ids],
            "options": _seeded(_encode_options(options)),
        }
        return lead(self._dm.group, request, self._dm._handlers, _token_or_none)
