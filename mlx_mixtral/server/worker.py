"""The server's one generation worker: a thread that runs queued generations one at a time.

Requests arrive on the event loop; each becomes a `Job` in a FIFO queue, so jobs run in arrival
order and two generations never share the device (or the model's caches). The worker drives an
`Engine` (generation through a prefix cache, in this process or on every rank of an `mlx.launch`
group) and hands every `GenerationResponse` back to the job's event loop; a job whose client went
away is cancelled between two tokens, which frees the worker for the next one. All MLX work happens
on this thread, loading the model included.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlx_mixtral.batching.scheduler import BatchEvent, BatchGenerator
from mlx_mixtral.distributed.model import DistributedModel
from mlx_mixtral.errors import DistributedError, MixtralError, OptionError
from mlx_mixtral.generate import GenerationResponse
from mlx_mixtral.language_model import LanguageModel
from mlx_mixtral.prefix_cache import PrefixCache
from mlx_mixtral.tokenizer.core import Tokenizer

log = logging.getLogger("mlx_mixtral.server")


class ShuttingDown(Exception):
    """The server is stopping: the job was cut short or never started."""


@dataclass
class Finished:
    """The job's last event: `error` is set when the generation failed."""

    error: BaseException | None = None


@dataclass
class Job:
    ids: list[int]  # the whole prompt
    options: dict[str, Any]  # keyword options of stream_generate
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # GenerationResponse ..., then Finished
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (set before the first event)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: GenerationResponse | Finished) -> None:
        """Pass an event to the request's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()


class Engine(Protocol):
    """What the worker drives: the model (for its `args`), its tokenizer, and generation."""

    model: LanguageModel
    tokenizer: Tokenizer
    batcher: BatchGenerator | None  # set: jobs are decoded together (Worker._serve_batched)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the latest `stream` found cached (known once it yielded)."""
        ...

    def stream(self, ids: list[int], options: dict[str, Any]) -> Iterator[GenerationResponse]: ...

    def cache_entries(self) -> int | None: ...

    def fatal(self, error: BaseException) -> bool:
        """Whether a generation error leaves the engine unusable (a distributed group that broke)."""
        ...

    def close(self) -> None: ...


class LocalEngine:
    """One process: `stream_generate` through a `PrefixCache`, or with `max_batch` > 1 a
    `BatchGenerator` whose sequences take their caches from, and give them back to, that cache."""

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        *,
        max_kv_size: int | None = None,
        prompt_cache_size: int = 4,
        max_batch: int = 1,
        kv_tokens: int | None = None,
        speculative: dict[str, Any] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_cache = PrefixCache(lambda: model.make_cache(max_kv_size), prompt_cache_size)
        # stream_generate's draft_model / num_draft_tokens / prompt_lookup for every request that
        # can take them (not structured ones: their grammar matcher cannot take back drafts).
        self.speculative = dict(speculative or {})
        speculating = any(self.speculative.get(k) is not None for k in ("draft_model", "prompt_lookup"))
        if speculating and max_batch > 1:
            raise OptionError(
                f"speculative decoding serves one request at a time, got max_batch={max_batch}: use max_batch=1",
                option="max_batch",
            )
        self.batcher = None
        if max_batch > 1:
            self.batcher = BatchGenerator(
                model,
                tokenizer,
                max_batch=max_batch,
                max_kv_size=max_kv_size,
                take_cache=self.prompt_cache.take,
                put_cache=self.prompt_cache.put,
                kv_tokens=kv_tokens,
            )

    @property
    def cached_tokens(self) -> int:
        return self.prompt_cache.cached_tokens

    def stream(self, ids: list[int], options: dict[str, Any]) -> Iterator[GenerationResponse]:
        structured = options.get("json_schema") is not None or (
            options.get("tools") and options.get("tool_choice") != "none"
        )
        if self.speculative and not structured:
            options = {**options, **self.speculative}
        return self.prompt_cache.stream(self.model, self.tokenizer, ids, **options)

    def cache_entries(self) -> int | None:
        return len(self.prompt_cache)

    def fatal(self, error: BaseException) -> bool:
        return False

    def close(self) -> None:
        pass


class DistributedEngine:
    """Rank 0 of a model sharded over an `mlx.launch` group (`DistributedModel`): its worker drives
    the same prefix cache and generation on every rank (the others run as a `Follower`). Jobs run
    one at a time: batching would need every rank to run the same scheduler in lockstep."""

    def __init__(self, dm: DistributedModel, *, max_kv_size: int | None = None, prompt_cache_size: int = 4):
        self.dm, self.model, self.tokenizer = dm, dm.model, dm.tokenizer
        self.broken = False
        self.batcher = None
        self._cache = dm.prefix_cache(prompt_cache_size, max_kv_size)

    @property
    def cached_tokens(self) -> int:
        return self._cache.cached_tokens

    def stream(self, ids: list[int], options: dict[str, Any]) -> Iterator[GenerationResponse]:
        return self._cache.stream(ids, **options)

    def cache_entries(self) -> int | None:
        return None  # each rank holds its own part; rank 0 does not count them

    def fatal(self, error: BaseException) -> bool:
        self.broken = self.broken or isinstance(error, DistributedError)
        return self.broken

    def close(self) -> None:
        if not self.broken:  # a broken group cannot be released
            self.dm.close()


@dataclass
class Follower:
    """A rank other than 0 of a distributed group: it serves no requests, it mirrors rank 0's
    generations until rank 0 releases it (`follow` returns the exit status)."""

    follow: Callable[[], int]


class Worker:
    """Loads the model on its own thread, then serves jobs there. MLX streams belong to the thread
    that made them (since mlx 0.31.2), so the weights, caches and every graph of the model are made
    and evaluated on this one thread; only plain Python values cross to the event loop. On a
    follower rank the thread follows rank 0 instead (see `wait`)."""

    def __init__(self, load: Callable[[], Engine | Follower]):
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self.busy = False
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0}
        self.exit_status = 0
        self.is_leader = True  # False on a follower rank, which serves nothing
        self.fatal_error: BaseException | None = None  # what made the engine unusable, if anything
        self.on_fatal: Callable[[], None] = lambda: None  # the server sets this to stop itself
        self._stopping = False
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), name="mlx-mixtral-generation", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        if self.is_leader:
            self.model, self.tokenizer = self.engine.model, self.engine.tokenizer

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        with self._lock:  # never behind the thread's last look at the queue
            if self._stopping:
                job.emit(Finished(ShuttingDown()))
            else:
                self._jobs.put(job)

    def shut_down(self) -> None:
        """Stop the running job and refuse the waiting ones (each gets a ShuttingDown), without
        waiting; their responses then end, so the HTTP server can close its connections."""
        with self._lock:
            self._stopping = True
            self._jobs.put(None)

    def stop(self) -> None:
        """shut_down, then wait for the thread to end."""
        self.shut_down()
        self._thread.join(timeout=5)

    def wait(self) -> int:
        """A follower rank: wait until rank 0 releases it; its exit status."""
        self._thread.join()
        return self.exit_status

    def _run(self, load: Callable[[], Engine | Follower]) -> None:
        try:
            loaded = load()
            if isinstance(loaded, Follower):
                self.is_leader = False
            else:
                self.engine = loaded
        except BaseException as e:  # raised again by __init__ on the caller's thread
            self._load_error = e
            return
        finally:
            self._loaded.set()
        if isinstance(loaded, Follower):
            self.exit_status = loaded.follow()
            return
        if self.engine.batcher is not None:
            try:
                self._serve_batched(self.engine.batcher)
            finally:
                self.engine.close()
            return
        try:
            while (job := self._jobs.get()) is not None or not self._jobs.empty():
                if job is None:  # a shut_down sentinel: the jobs behind it are refused too
                    continue
                if job.cancelled.is_set() or self._stopping:  # its client left while it waited
                    self.stats["cancelled"] += 1
                    job.emit(Finished(ShuttingDown() if self._stopping else None))
                    continue
                self.busy = True
                try:
                    self._serve(job)
                finally:
                    self.busy = False
        finally:
            self.engine.close()

    def _serve(self, job: Job) -> None:
        stream = self.engine.stream(job.ids, job.options)
        try:
            for response in stream:
                job.cached_tokens = self.engine.cached_tokens
                self.stats["generated_tokens"] += 1
                job.emit(response)
                if job.cancelled.is_set() or self._stopping:
                    break
        except Exception as e:  # reported to the client; the worker keeps serving unless it cannot
            self.stats["failed"] += 1
            job.emit(Finished(e))
            if self.engine.fatal(e):
                self.fatal_error = e
                self.shut_down()
                self.on_fatal()
            else:
                log.exception("generation failed")
            return
        finally:
            stream.close()  # a stopped generation puts its cache back now, before the next job
        self.stats["cancelled" if job.cancelled.is_set() else "completed"] += 1
        job.emit(Finished(ShuttingDown() if self._stopping else None))

    def _serve_batched(self, batcher: BatchGenerator) -> None:
        """Admit queued jobs between steps and run one batch step at a time until shut down. A job
        that cannot start fails alone; one whose client left is cancelled within a step."""
        jobs: dict[int, Job] = {}
        while True:
            wait = not batcher.busy  # idle: sleep until a job (or the shut-down sentinel) comes
            while True:
                try:
                    job = self._jobs.get(block=wait)
                except queue.Empty:
                    break
                wait = False
                if job is None:
                    continue
                if job.cancelled.is_set() or self._stopping:
                    self.stats["cancelled"] += 1
                    job.emit(Finished(ShuttingDown() if self._stopping else None))
                    continue
                try:
                    jobs[batcher.add(job.ids, **job.options)] = job
                except Exception as e:  # a bad request: its own error, nobody else's
                    self.stats["failed"] += 1
                    if not isinstance(e, MixtralError):  # the app checked the request: this is a bug
                        log.error("request could not start", exc_info=e)
                    job.emit(Finished(e))
            if self._stopping:
                for job in jobs.values():
                    self.stats["cancelled"] += 1
                    job.emit(Finished(ShuttingDown()))
                return
            for uid, job in jobs.items():
                if job.cancelled.is_set():
                    batcher.cancel(uid)
            self.busy = batcher.busy
            try:
                events = batcher.step()
            except Exception as e:  # the batch's forward pass failed: every job in it did
                log.exception("batch step failed")
                for job in jobs.values():
                    self.stats["failed"] += 1
                    job.emit(Finished(e))
                jobs.clear()
                batcher.reset()
                continue
            for event in events:
                self._deliver(jobs, event)
            self.busy = batcher.busy

    def _deliver(self, jobs: dict[int, Job], event: BatchEvent) -> None:
        job = jobs[event.uid]
        if event.response is not None:
            job.cached_tokens = event.cached_tokens
            self.stats["generated_tokens"] += 1
            job.emit(event.response)
        if not event.done:
            return
        del jobs[event.uid]
        if event.error is not None:
            self.stats["failed"] += 1
            if not isinstance(event.error, MixtralError):
                log.error("generation failed", exc_info=event.error)
        else:
            self.stats["cancelled" if job.cancelled.is_set() else "completed"] += 1
        job.emit(Finished(event.error))
