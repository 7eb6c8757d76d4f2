"""Continuous batching: one forward pass per step decodes every running sequence.

Shapes: B running sequences, V vocab, T tokens a sequence's logits processors see.

`BatchGenerator.add` queues a request (checked at once, as `stream_generate` checks it); `step`
runs one scheduler step and returns what happened to each sequence:

1. Admission: queued requests start, oldest first, while fewer than `max_batch` are started.
2. Prefill: one chunk (`prefill_chunk` tokens) of one starting request's prompt, in its own
   one-sequence cache, so a long prompt delays the running streams by one chunk per step. The
   shortest remaining prompt goes first, so a short prompt behind a long one waits for the chunk
   in progress, not for the whole long prompt. A
   prompt prefilled up to its last token joins the batch (`BatchKVCache.extend`); that token is its
   first decode input, as in `generate_step`.
3. Decode: the next step's graph is built and queued (`mx.async_eval`) before the previous step's
   tokens are read, so the host's work overlaps the device's, as in `generate_step`; the prefill
   chunk comes after the read, and waits while a row that just joined has not had its first token
   returned. Each
   sequence samples with its own sampler, logits processors, seed and history; its tokens become
   text through its own `ResponseText` (stop strings, EOS, max_tokens, logprobs, tool calls).

A sequence that finishes or is cancelled leaves the batch at the step its last token is read
(its row still rode along in the step queued just before, whose result for it is dropped). Its
one-sequence cache is handed to `put_cache` (the server's prefix cache) when one is given.
A request whose options or prompt are bad fails alone, with its own error event.
"""

from __future__ import annotations

import inspect
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlx_mixtral.batching.cache import BatchKVCache
from mlx_mixtral.cache import Cache
from mlx_mixtral.errors import OptionError
from mlx_mixtral.generate import DEFAULT_PREFILL_CHUNK, GenerationResponse, Request, prepare_request
from mlx_mixtral.language_model import LanguageModel
from mlx_mixtral.model import kv_window
from mlx_mixtral.tokenizer.core import Tokenizer

DEFAULT_MAX_BATCH = 8

# (prompt ids) -> (a one-sequence cache, how many leading ids it already holds)
TakeCache = Callable[[list[int]], tuple[list[Cache], int]]
# (the cache, the ids that went through it)
PutCache = Callable[[list[Cache], list[int]], None]


@dataclass
class BatchEvent:
    """What one step did to one sequence: a new token (`response`), a failure (`error`, the
    sequence is gone), and whether the sequence has left the batch (`done`)."""

    uid: int
    response: GenerationResponse | None = None
    error: BaseException | None = None
    done: bool = False
    cached_tokens: int = 0  # prompt tokens its cache already held when it started


@dataclass
class _Sequence:
    uid: int
    ids: list[int]  # the whole prompt
    request: Request
    cache: list[Cache] | None = None  # its own cache while it prefills
    cached: int = 0  # prompt ids the taken cache already held
    rest: mx.array | None = None  # prompt ids still to prefill; the last one is the first decode input
    history: mx.array | None = None  # (T,) what its logits processors see
    key: mx.array | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False  # leaves at the next step (also set when it finished or failed)
    final: GenerationResponse | None = None  # the response that finished it
    error: BaseException | None = None


@dataclass
class _Step:
    """A queued decode step: the sequences it ran (in batch-row order) and its lazy results."""

    rows: list[_Sequence]
    tokens: mx.array  # (B,)
    logprobs: mx.array  # (B, V)


# stream_generate's keywords that only a single sequence can use
_SINGLE_SEQUENCE = ("cache", "prefill_chunk", "draft_model", "prompt_lookup", "context")
_BATCH_OPTIONS = frozenset(inspect.signature(prepare_request).parameters) - {
    "model",
    "tokenizer",
    "prompt",
    "held",
    "bounded",
    "speculating",
}


def _batch_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` without speculative decoding's keywords when they turn nothing on (as
    `generation_options` returns them); a one-line OptionError for a key a batch cannot honour."""
    kept = {}
    for name, value in options.items():
        if name == "num_draft_tokens" or (name in ("draft_model", "prompt_lookup") and value is None):
            continue  # speculation off (num_draft_tokens means nothing without a draft source)
        if name in _SINGLE_SEQUENCE:
            raise OptionError(
                f"{name} is a stream_generate option for one sequence; a batch does not take it", option=name
            )
        if name not in _BATCH_OPTIONS:
            raise OptionError(
                f"unknown option {name!r}; expected one of {', '.join(sorted(_BATCH_OPTIONS))}", option=name
            )
        kept[name] = value
    return kept


class BatchGenerator:
    """Decodes up to `max_batch` sequences together (see the module docstring). Runs on one
    thread: the one that owns the model's MLX arrays."""

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_kv_size: int | None = None,
        take_cache: TakeCache | None = None,
        put_cache: PutCache | None = None,
        kv_tokens: int | None = None,
    ):
        if max_batch < 1:
            raise OptionError(f"max_batch must be >= 1, got {max_batch}", option="max_batch")
        if prefill_chunk < 1:
            raise OptionError(f"prefill_chunk must be >= 1, got {prefill_chunk}", option="prefill_chunk")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk, self.max_kv_size = max_batch, prefill_chunk, max_kv_size
        self.take_cache = take_cache or (lambda ids: (model.make_cache(max_kv_size), 0))
        self.put_cache = put_cache
        self.window = kv_window(model.args.sliding_window, max_kv_size)
        # A batch's KV buffer is (rows x longest row) slots; `kv_tokens` bounds that (what the
        # memory plan counted), so a request waits while admitting it would pass it.
        self.kv_tokens = kv_tokens
        self._waiting: deque[_Sequence] = deque()
        self._starting: list[_Sequence] = []  # admitted, prefilling
        self._rows: list[_Sequence] = []  # in the batch, in row order
        self._cache: list[BatchKVCache] = []
        self._inflight: _Step | None = None
        self._next_uid = 0
        self._by_uid: dict[int, _Sequence] = {}

    # The caller's side.

    def add(self, prompt: str | Sequence[int] | mx.array, **options: Any) -> int:
        """Queue a prompt (text, encoded with BOS, or token ids) with `stream_generate`'s keyword
        options; its uid. The request is checked here, as `stream_generate` checks it (an
        OptionError, SchemaError or ContextLimitError for this request only). Speculative decoding
        (draft_model, prompt_lookup) is stream_generate's alone: its rounds verify a different
        number of tokens per sequence, which one batched forward cannot."""
        options = _batch_options(options)
        request = prepare_request(self.model, self.tokenizer, prompt, bounded=self.window is not None, **options)
        seq = _Sequence(self._next_uid, list(request.ids), request)
        self._next_uid += 1
        self._waiting.append(seq)
        self._by_uid[seq.uid] = seq
        return seq.uid

    def cancel(self, uid: int) -> None:
        """Stop a sequence; it leaves the batch at the next step (with a `done` event)."""
        seq = self._by_uid.get(uid)
        if seq is not None:
            seq.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._starting or self._rows or self._inflight)

    @property
    def running(self) -> int:
        """Sequences started (prefilling or decoding)."""
        return len(self._starting) + len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def reset(self) -> None:
        """Drop every sequence (after a failed step, whose caches are no longer consistent)."""
        self._waiting.clear()
        self._starting, self._rows, self._cache, self._inflight = [], [], [], None
        self._by_uid.clear()

    # One step.

    def step(self) -> list[BatchEvent]:
        events: list[BatchEvent] = []
        self._drop_cancelled_waiting(events)
        self._admit(events)
        previous, self._inflight = self._inflight, None
        if self._rows:
            self._inflight = self._decode(previous)  # queued before reading `previous`: they overlap
        if previous is not None:
            self._read(previous, events)
        # A row that just joined gets its first token out (returned with this step's events) before
        # the next chunk of someone else's prompt holds the device: its time to first token is not
        # a chunk longer.
        if any(len(seq.generated) <= 1 for seq in self._rows):
            self._join(self._ready(events))
        else:
            self._join(self._prefill_one(events))
        return events

    def _drop_cancelled_waiting(self, events: list[BatchEvent]) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._forget(seq, events)

    def _admit(self, events: list[BatchEvent]) -> None:
        while self._waiting and self.running < self.max_batch and self._fits(self._waiting[0]):
            seq = self._waiting.popleft()
            try:
                self._start(seq)
            except Exception as e:  # a prompt that cannot start fails alone
                self._forget(seq, events, error=e)
                continue
            self._starting.append(seq)

    def _fits(self, seq: _Sequence) -> bool:
        """Whether the KV buffer stays within `kv_tokens` with `seq` in the batch too (each row
        counted at the most it can reach: its prompt plus max_tokens). Alone, a request always runs."""
        started = self._starting + self._rows
        if self.kv_tokens is None or not started:
            return True
        longest = max(self._reach(s) for s in [*started, seq])
        return (len(started) + 1) * longest <= self.kv_tokens

    def _reach(self, seq: _Sequence) -> int:
        """The most slots a row can need: its prompt plus max_tokens, within the window/context."""
        limit = self.window or self.model.args.max_position_embeddings
        if seq.request.max_tokens is None:
            return limit or len(seq.ids)
        most = len(seq.ids) + seq.request.max_tokens
        return most if limit is None else min(most, limit)

    def _start(self, seq: _Sequence) -> None:
        # The cache holds exactly `cached` ids, so the context rule `add` applied to the whole
        # prompt still holds; only what is left to prefill, and count, changes.
        seq.cache, seq.cached = self.take_cache(seq.ids)
        request = seq.request
        request.ids = seq.ids[seq.cached :]
        request.text.prompt_tokens = len(request.ids)
        request.text.start = time.perf_counter()  # prompt speed counts from here, not from the queue
        seq.rest = mx.array(request.ids, mx.uint32)
        seq.history = seq.rest
        seq.key = mx.random.key(int.from_bytes(os.urandom(4), "little")) if request.key is None else request.key

    def _prefill_one(self, events: list[BatchEvent]) -> list[_Sequence]:
        """One chunk of the shortest starting prompt; the starting sequences ready to decode."""
        # Shortest remaining prompt first: a short prompt that arrives while a long one prefills
        # waits for at most the chunk in progress; the long one goes on when no short one waits.
        # One that needs no prefill (a one-token prompt, or all but its last token cached) joins
        # now, without a chunk of another prompt first.
        if any(s.cancelled or s.request.max_tokens == 0 or s.rest.size <= 1 for s in self._starting):
            return self._ready(events)
        if self._starting:
            seq = min(self._starting, key=lambda s: s.rest.size)
            n = min(self.prefill_chunk, seq.rest.size - 1)
            try:
                self.model(seq.rest[:n][None], cache=seq.cache)
                mx.eval([c.state for c in seq.cache])
                seq.rest = seq.rest[n:]
            except Exception as e:  # its own forward pass failed (out of memory, ...)
                self._starting.remove(seq)
                self._forget(seq, events, error=e)
        return self._ready(events)

    def _ready(self, events: list[BatchEvent]) -> list[_Sequence]:
        ready = []
        for seq in list(self._starting):
            if seq.cancelled or seq.request.max_tokens == 0:  # nothing to generate: done without a token
                self._starting.remove(seq)
                self._leave(seq, seq.cache, events)
            elif seq.rest.size == 1:
                self._starting.remove(seq)
                ready.append(seq)
        return ready

    def _join(self, joining: list[_Sequence]) -> None:
        for seq in joining:
            if not self._cache:
                self._cache = [BatchKVCache.like(layer) for layer in seq.cache]
            for batch_layer, layer in zip(self._cache, seq.cache):
                batch_layer.extend(layer)
            seq.cache = None
            self._rows.append(seq)

    def _decode(self, previous: _Step | None) -> _Step:
        """Queue one decode step over every row; inputs are the previous step's (lazy) tokens for
        the rows it ran and the last prompt token for rows that just joined."""
        earlier = {} if previous is None else {id(s): i for i, s in enumerate(previous.rows)}
        inputs = [
            previous.tokens[earlier[id(s)] : earlier[id(s)] + 1] if id(s) in earlier else s.rest for s in self._rows
        ]
        tokens_in = mx.concatenate(inputs).astype(mx.uint32)  # (B,)
        logits = self.model(tokens_in[:, None], cache=self._cache)[:, -1, :]  # (B, V)
        tokens, logprobs = [], []
        for i, seq in enumerate(self._rows):
            row = logits[i : i + 1]  # (1, V)
            for process in seq.request.processors:
                row = process(seq.history, row)
            row_logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)  # (1, V)
            seq.key, subkey = mx.random.split(seq.key)
            token = seq.request.sampler(row_logprobs, subkey)  # (1,)
            if seq.request.processors:
                seq.history = mx.concatenate([seq.history, token.astype(seq.history.dtype)])  # (T + 1,)
            tokens.append(token)
            logprobs.append(row_logprobs)
        step = _Step(list(self._rows), mx.concatenate(tokens), mx.concatenate(logprobs))  # (B,), (B, V)
        mx.async_eval(step.tokens, step.logprobs)
        return step

    def _read(self, step: _Step, events: list[BatchEvent]) -> None:
        """Turn a finished step's tokens into responses; rows that ended leave the batch."""
        tokens = step.tokens.tolist()  # the one host sync per step
        for i, (seq, token) in enumerate(zip(step.rows, tokens)):
            seq.generated.append(token)  # fed to the queued step, so its cache holds it
            if seq.cancelled:
                continue
            try:
                response = seq.request.text.respond(token, step.logprobs[i])
            except Exception as e:  # its detokenizer or tool-call parser failed: it alone ends
                seq.cancelled, seq.error = True, e
                continue
            if response.finish_reason is None:
                events.append(BatchEvent(seq.uid, response=response, cached_tokens=seq.cached))
            else:
                seq.cancelled, seq.final = True, response
        self._remove_rows([s for s in self._rows if s.cancelled], events)

    def _remove_rows(self, leaving: list[_Sequence], events: list[BatchEvent]) -> None:
        if not leaving:
            return
        gone = {id(s) for s in leaving}
        keep = [i for i, s in enumerate(self._rows) if id(s) not in gone]
        for i, seq in enumerate(self._rows):
            if id(seq) in gone:
                cache = [layer.row(i) for layer in self._cache] if self.put_cache is not None else None
                self._leave(seq, cache, events)
        if self._inflight is not None:  # the queued step ran them too: drop their results
            rows = [i for i, s in enumerate(self._inflight.rows) if id(s) not in gone]
            index = mx.array(rows, mx.int32)
            self._inflight = _Step(
                [self._inflight.rows[i] for i in rows], self._inflight.tokens[index], self._inflight.logprobs[index]
            )
        for layer in self._cache:
            layer.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = []

    def _leave(self, seq: _Sequence, cache: list[Cache] | None, events: list[BatchEvent]) -> None:
        if cache is not None:
            self._put(seq, cache)
        self._forget(seq, events)

    def _put(self, seq: _Sequence, cache: list[Cache]) -> None:
        if self.put_cache is not None:
            self.put_cache(cache, seq.ids[: seq.cached] + seq.request.ids + seq.generated)

    def _forget(self, seq: _Sequence, events: list[BatchEvent], error: BaseException | None = None) -> None:
        """The sequence's last event: its final response, its error, or (cancelled) neither."""
        self._by_uid.pop(seq.uid, None)
        events.append(
            BatchEvent(seq.uid, response=seq.final, error=error or seq.error, done=True, cached_tokens=seq.cached)
        )
