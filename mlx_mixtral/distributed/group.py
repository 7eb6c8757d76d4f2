"""One model on several processes or machines with MLX's own `mx.distributed` (run under `mlx.launch`).

Rank 0 talks to the user; the other ranks follow. For every request rank 0 shares the request
(prompt token ids and options, as JSON) and every rank then runs the *same* generator with the
same arguments, so the collectives inside the sharded model (sharding.py) line up. Between items
the ranks agree, with one tiny all_sum, whether to go on: rank 0's consumer may stop early
(stop string, client gone), and a follower must then not start the next forward pass. The same
number also carries rank 0's token so a follower that diverged stops with a clear error.

Failures end every rank with a one-line message instead of a hang:
- a rank that exits closes its sockets; the others' next collective raises and becomes
  DistributedError ("lost the connection ...");
- a rank that stops answering without closing them (machine off, cable out) is caught by a
  watchdog that ends this process after `MLX_MIXTRAL_DIST_TIMEOUT` seconds (default 300) of one
  step (ten times that for a request's first step, which includes the prompt's prefill), exit
  code 3;
- different model directories (or package versions) on different ranks are found at start by
  exchanging digests.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from mlx_mixtral.config import config_path
from mlx_mixtral.errors import DistributedError
from mlx_mixtral.weights import find_weight_files, read_header

T = TypeVar("T")

TIMEOUT_ENV = "MLX_MIXTRAL_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
EXIT_TIMEOUT = 3
FIRST_STEP_FACTOR = 10  # the first item of a request (prompt prefill) may take this many timeouts
_STOP = 0  # lock-step flag: rank 0 will not ask for another item
_END = object()
# Errors the communication backends raise when a peer is gone, e.g. "[ring] connection to a peer was lost".
_BACKEND_ERROR = re.compile(r"^\[(ring|jaccl|mpi|nccl)\]")


def step_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return seconds


class Watchdog:
    """Ends the process with a one-line message when an armed step runs longer than `timeout` s.

    A collective waits inside `mx.eval`, which releases the GIL, so this thread still runs; the
    main thread cannot be interrupted there, hence `os._exit`. This is the one place where library
    code writes to stderr: it is the process's last word."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self._deadline: float | None = None
        self._what, self._limit = "", timeout
        threading.Thread(target=self._watch, daemon=True, name="mlx-mixtral-watchdog").start()

    @contextlib.contextmanager
    def armed(self, what: str, factor: float = 1.0):
        self._what, self._limit = what, self.timeout * factor
        self._deadline = time.monotonic() + self._limit
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                os.write(
                    2,
                    (
                        f"mlx-mixtral: rank {self.rank}: no answer from the other ranks for {self._limit:g} s "
                        f"while {self._what}; stopping (a rank hung or its machine is unreachable; "
                        f"{TIMEOUT_ENV} sets the limit)\n"
                    ).encode(),
                )
                os._exit(EXIT_TIMEOUT)


@functools.cache
def _watchdog(rank: int) -> Watchdog:
    return Watchdog(rank, step_timeout())


@contextlib.contextmanager
def _process_deadline(seconds: float, message: str):
    """Kill this process with `message` on stderr unless the block ends within `seconds`.

    `mx.distributed.init` holds the GIL while it waits for peers to connect, so no thread of this
    process can act then; a small helper process watches instead (it exits when its stdin closes)."""
    code = (
        "import os, select, signal, sys\n"
        "if not select.select([sys.stdin], [], [], float(sys.argv[1]))[0]:\n"
        "    os.write(2, sys.argv[2].encode() + b'\\n'); os.kill(int(sys.argv[3]), signal.SIGKILL)\n"
    )
    helper = subprocess.Popen(
        [sys.executable, "-c", code, str(seconds), message, str(os.getpid())], stdin=subprocess.PIPE
    )
    try:
        yield
    finally:
        helper.stdin.close()
        helper.wait()


def init_group(timeout: float | None = None) -> mx.distributed.Group:
    """Join the group `mlx.launch` set up (any backend MLX has: ring over TCP, JACCL over
    Thunderbolt RDMA, MPI). Raises DistributedError when this process was not launched as a rank;
    ends the process if the other ranks do not connect within `timeout` seconds."""
    timeout = timeout or step_timeout()
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (
        f"mlx-mixtral: rank {rank}: the other ranks did not connect within {timeout:g} s "
        f"(check the hostfile's IPs and that every host started; {TIMEOUT_ENV} sets the limit)"
    )
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and Path(hostfile).is_file() and not Path(hostfile).read_text().strip():
        # `mlx.launch -n 1` writes an empty hostfile, which the ring backend cannot parse: a group of one.
        del os.environ["MLX_HOSTFILE"]
        return mx.distributed.init()
    with _process_deadline(timeout, message):
        try:
            return mx.distributed.init(strict=True)
        except RuntimeError as e:
            raise DistributedError(
                f"--distributed: no distributed backend could start ({e}); run the command "
                f"under `mlx.launch` (see the README, 'Two Macs')"
            ) from None


def _collective(what: str, rank: int, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as e:
        if not _BACKEND_ERROR.match(str(e)):
            raise
        raise DistributedError(
            f"rank {rank}: lost the connection to another rank while {what} ({e}); it exited "
            f"or its machine is unreachable, see its own message"
        ) from None


def _sum_int32(group: mx.distributed.Group, values: np.ndarray, what: str) -> np.ndarray:
    def run():
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.int32), group=group)
        mx.eval(out)  # releases the GIL, so the watchdog can act while this waits
        return np.array(out)

    return _collective(what, group.rank(), run)


def model_digest(model_dir: str | Path) -> bytes:
    """SHA-256 of what must be equal on every rank: the config file, and for each weight file its
    name, size, tensor table (names, dtypes, shapes, offsets) and a few KB of data at the start,
    middle and end of its tensor bytes (enough to tell two fine-tunes of one architecture apart
    without reading gigabytes). A corrupt weight file raises WeightsError naming it."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    config = config_path(model_dir)
    if config is not None:
        h.update(config.read_bytes())
    for path in find_weight_files(model_dir):
        tensors = read_header(path)
        size = path.stat().st_size
        table = sorted((name, t.dtype, t.shape, t.start) for name, t in tensors.items())
        h.update(f"{path.name}:{size}:{table}".encode())
        data = min((t.start for t in tensors.values()), default=size)
        with open(path, "rb") as f:
            for at in (data, (data + size) // 2, max(data, size - 4096)):
                f.seek(at)
                h.update(f.read(4096))
    return h.digest()


def _software_digest() -> bytes:
    from mlx_mixtral import __version__

    return hashlib.sha256(f"mlx-mixtral {__version__} mlx {mx.__version__}".encode()).digest()


def check_same_model(group: mx.distributed.Group, model_dir: str | Path) -> None:
    """Compare every rank's model directory (and package versions) with rank 0's; raise
    DistributedError on every rank if any differs. One fixed-size exchange, so it cannot hang on
    a mismatch the way collectives of differently shaped models would."""
    rank, size = group.rank(), group.size()
    if size == 1:
        return
    mine = np.frombuffer(model_digest(model_dir) + _software_digest(), np.uint8).astype(np.int32)
    every = np.zeros((size, mine.size), np.int32)
    every[rank] = mine
    every = _sum_int32(group, every, "comparing model directories")  # an all_gather made of one all_sum
    model_bad = [r for r in range(size) if not np.array_equal(every[r, :32], every[0, :32])]
    soft_bad = [r for r in range(size) if not np.array_equal(every[r, 32:], every[0, 32:])]
    if soft_bad:
        raise DistributedError(
            f"rank {rank}: ranks {soft_bad} run a different mlx-mixtral or mlx version than rank 0; "
            f"install the same versions on every machine"
        )
    if model_bad:
        raise DistributedError(
            f"rank {rank}: the model directory differs between ranks (ranks {model_bad} do not "
            f"match rank 0; this rank read {model_dir}); every machine needs an identical copy"
        )


def share_request(group: mx.distributed.Group, request: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rank 0's request (a JSON-able dict, or None meaning "shut down") on every rank; the other
    ranks pass anything and wait here, without a time limit, until rank 0 has one."""
    rank = group.rank()
    data = json.dumps(request).encode() if rank == 0 else b""
    # Rank 0 expects the others to be waiting already; they wait for rank 0 as long as it takes.
    guard = _watchdog(rank).armed("sending a request") if rank == 0 else contextlib.nullcontext()
    with guard:
        n = int(_sum_int32(group, np.array([len(data)]), "receiving a request")[0])
        words = -(-n // 4)
        payload = np.zeros(words, np.int32)
        if rank == 0:
            payload[:] = np.frombuffer(data.ljust(words * 4, b"\0"), np.int32)
        payload = _sum_int32(group, payload, "receiving a request")  # others add zeros: exact
    return json.loads(payload.tobytes()[:n])


def barrier(group: mx.distributed.Group, what: str) -> None:
    """Wait, without a time limit, until every rank got here (e.g. finished loading)."""
    if group.size() > 1:
        _sum_int32(group, np.array([1]), what)


def lockstep(
    group: mx.distributed.Group,
    items: Iterable[T],
    token_of: Callable[[T], int | None] | None = None,
    watchdog: Watchdog | None = None,
) -> Iterator[T]:
    """Iterate `items` (the same generator, built from the same request, on every rank) in lock
    step: a follower asks for its next item only when rank 0's consumer did."""
    if group.size() == 1:
        yield from items
        return
    watchdog = watchdog or _watchdog(group.rank())
    step = _lead if group.rank() == 0 else _follow
    it = iter(items)
    try:
        yield from step(group, it, token_of or (lambda item: None), watchdog)
    finally:
        # Only once the ranks agreed to stop: the generator's own clean-up runs on every rank alike.
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _flag(group: mx.distributed.Group, value: int, watchdog: Watchdog) -> int:
    with watchdog.armed("agreeing on the next step"):
        return int(_sum_int32(group, np.array([value]), "agreeing on the next step")[0])


def _next(it: Iterator[T], group: mx.distributed.Group, watchdog: Watchdog, first: bool) -> T:
    # The first item of a request includes the prompt's whole prefill, which may legitimately take
    # many times longer than a decode step; a hang is still caught, only later.
    what = "processing the prompt" if first else "generating"
    with watchdog.armed(what, FIRST_STEP_FACTOR if first else 1.0):
        return _collective(what, group.rank(), lambda: next(it))


def _lead(group, it, token_of, watchdog):
    try:
        for n in itertools.count():
            try:
                item = _next(it, group, watchdog, first=n == 0)
            except StopIteration:
                break
            yield item
            token = token_of(item)
            _flag(group, 1 + (0 if token is None else token + 1), watchdog)  # the consumer wants more
    except DistributedError:
        raise  # the others are gone or will time out; nothing to tell them
    except BaseException:
        _flag(group, _STOP, watchdog)  # consumer closed us, or generation failed (the same way on every rank)
        raise
    _flag(group, _STOP, watchdog)


def _follow(group, it, token_of, watchdog):
    rank = group.rank()
    for n in itertools.count():
        failure = None
        try:
            item = _next(it, group, watchdog, first=n == 0)
        except StopIteration:
            item = _END
        except DistributedError:
            raise
        except Exception as e:  # generation failed here; rank 0 should have failed the same way
            item, failure = _END, e
        if item is _END:
            if _flag(group, 0, watchdog) != _STOP:
                why = f"failed ({failure})" if failure else "finished"
                raise DistributedError(f"rank {rank}: generation {why} here while rank 0 went on")
            return
        yield item
        flag = _flag(group, 0, watchdog)
        if flag == _STOP:
            return
        token = token_of(item)
        if token is not None and flag != token + 2:
            raise DistributedError(
                f"rank {rank}: generated token {token} where rank 0 generated {flag - 2}; "
                f"the ranks diverged (different seeds or software?)"
            )


def follow(
    group: mx.distributed.Group,
    handlers: dict[str, Callable[[dict[str, Any]], Iterable[T]]],
    token_of: Callable[[T], int | None] | None = None,
) -> None:
    """The whole life of a rank other than 0: run each request rank 0 shares with the handler it
    names (`request["op"]`), in lock step, until rank 0 sends None."""
    watchdog = _watchdog(group.rank())
    while (request := share_request(group, None)) is not None:
        handler = handlers.get(request.get("op"))
        if handler is None:
            raise DistributedError(f"rank {group.rank()}: rank 0 asked for unknown operation {request.get('op')!r}")
        for _ in lockstep(group, handler(request), token_of, watchdog):
            pass


def lead(
    group: mx.distributed.Group,
    request: dict[str, Any],
    handlers: dict[str, Callable[[dict[str, Any]], Iterable[T]]],
    token_of: Callable[[T], int | None] | None = None,
) -> Iterator[T]:
    """Rank 0: share `request` and yield the items of `handlers[request["op"]](request)`, which
    every other rank (running `follow` with the same handlers) computes alongside. Nothing is sent
    before the first item is asked for; closing the iterator early stops every rank."""
    if group.size() > 1:
        share_request(group, request)
    yield from lockstep(group, handlers[request["op"]](request), token_of)


def release_followers(group: mx.distributed.Group) -> None:
    """Rank 0 at exit: tell the followers to return from `follow`."""
    if group.size() > 1:
        share_request(group, None)
