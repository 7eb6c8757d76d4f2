"""The server's one generation worker: a thread that runs queued generations one at a time.

Requests arrive on the event loop; each becomes a `Job` in a FIFO queue, so jobs run in arrival
order and two generations never share the device (or the model's caches). The worker drives
`stream_generate` and hands every `GenerationResponse` back to the job's event loop; a job whose
client went away is cancelled between two tokens, which frees the worker for the next one. All MLX
work happens on this thread, loading the model included.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .generate import GenerationResponse, stream_generate
from .prefix_cache import PrefixCache

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


class Worker:
    """Loads the model on its own thread, then serves jobs there. MLX streams belong to the thread
    that made them (since mlx 0.31.2), so the weights, caches and every graph of the model are made
    and evaluated on this one thread; only plain Python values cross to the event loop."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], *, max_kv_size: int | None = None,
                 prompt_cache_size: int = 4):
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self.busy = False
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0}
        self._stopping = False
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load, max_kv_size, prompt_cache_size),
                                        name="mlx-mixtral-generation", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

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

    def _run(self, load: Callable[[], tuple[Any, Any]], max_kv_size: int | None, prompt_cache_size: int) -> None:
        try:
            self.model, self.tokenizer = load()
            self.prompt_cache = PrefixCache(lambda: self.model.make_cache(max_kv_size), prompt_cache_size)
        except BaseException as e:  # raised again by __init__ on the caller's thread
            self._load_error = e
            return
        finally:
            self._loaded.set()
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

    def _serve(self, job: Job) -> None:
        cache, kept = self.prompt_cache.take(job.ids)
        job.cached_tokens = kept
        fed = list(job.ids)
        try:
            for response in stream_generate(self.model, self.tokenizer, job.ids[kept:], cache=cache, **job.options):
                fed.append(response.token)
                self.stats["generated_tokens"] += 1
                job.emit(response)
                if job.cancelled.is_set() or self._stopping:
                    break
        except Exception as e:  # reported to the client; the worker keeps serving
            log.exception("generation failed")
            self.stats["failed"] += 1
            job.emit(Finished(e))
            return
        # A cancelled generation still leaves a valid cache (prompt + the tokens it produced).
        self.prompt_cache.put(cache, fed)
        self.stats["cancelled" if job.cancelled.is_set() else "completed"] += 1
        job.emit(Finished(ShuttingDown() if self._stopping else None))
