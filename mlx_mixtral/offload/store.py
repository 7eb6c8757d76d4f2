"""Where each expert's bytes are in the model's safetensors files, and reading exactly those.

safetensors stores a tensor row-major and contiguous after its 8-byte header length and JSON
header, so expert e of a stacked `(E, out, in)` tensor occupies bytes [start + e*n, start + (e+1)*n)
with n = size / E; the per-expert layout (`experts.{e}.w1`, ...) holds each expert in tensors of its
own. Reads use positioned I/O on file descriptors opened once (thread-safe, no shared file offset),
so the prefetch thread and the generation thread can read at the same time.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_mixtral.dtypes import SAFETENSORS
from mlx_mixtral.errors import WeightsError
from mlx_mixtral.weights import TensorInfo


@dataclass(frozen=True)
class Extent:
    """One expert's part of one parameter: where it is and what it is."""

    file: Path
    offset: int
    nbytes: int
    dtype: str  # safetensors code
    shape: tuple[int, ...]  # of this expert's part


def expert_extents(sources: list[str], headers: dict[str, TensorInfo], num_experts: int) -> list[Extent]:
    """The extent of each expert of one parameter stored as `sources`: one stacked tensor, or one
    tensor per expert in expert order (as loader.source_tensors gives them)."""
    if len(sources) == 1:
        info = headers[sources[0]]
        if info.shape[0] != num_experts or info.nbytes % num_experts:
            raise WeightsError(f"{info.file}: tensor {sources[0]!r} of shape {list(info.shape)} does not stack "
                               f"{num_experts} experts")  # fmt: skip
        size = info.nbytes // num_experts
        return [Extent(info.file, info.start + e * size, size, info.dtype, info.shape[1:]) for e in range(num_experts)]
    return [Extent(headers[s].file, headers[s].start, headers[s].nbytes, headers[s].dtype, headers[s].shape)
            for s in sources]  # fmt: skip


class ExpertStore:
    """Reads experts by (layer, expert): {parameter name: numpy array in the stored dtype}.

    `cold=True` asks the kernel to drop what was read from its page cache afterwards (Linux
    posix_fadvise DONTNEED), so that every read comes from the disk, as when the model is larger
    than the page cache can hold; benchmarks use it to measure the disk, not memory."""

    def __init__(self, extents: dict[int, dict[str, list[Extent]]], *, cold: bool = False):
        self.extents = extents  # MoE layer index -> parameter name ("gate_proj.weight", ...) -> per-expert extents
        self.cold = cold and hasattr(os, "posix_fadvise")
        self._fds: dict[Path, int] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._fds)
        # Read buffers come back (`release`) once copied into a slot and are reused: fresh multi-MB
        # numpy arrays per miss would leave the C allocator's heap, and so the process, ever larger.
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def expert_bytes(self, layer: int) -> int:
        return sum(parts[0].nbytes for parts in self.extents[layer].values())

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """The expert's parts in buffers of the store's own; `release` them when done."""
        return {name: self._read(parts[expert], layer, expert) for name, parts in self.extents[layer].items()}

    def release(self, arrays: dict[str, np.ndarray]) -> None:
        with self._lock:
            for a in arrays.values():
                self._free.setdefault((a.shape, a.dtype.str), []).append(a)

    def _buffer(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, np.dtype(dtype).str))
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise WeightsError(f"{file}: cannot open to read experts ({e.strerror}); was the model moved or "
                                   f"deleted while it ran?") from None  # fmt: skip
        return fd

    def _read(self, extent: Extent, layer: int, expert: int) -> np.ndarray:
        storage = SAFETENSORS[extent.dtype]
        out = self._buffer(extent.shape, storage.numpy)
        view = memoryview(out).cast("B")
        fd, done = self._fd(extent.file), 0
        while done < extent.nbytes:
            try:
                n = _pread_into(fd, view[done:], extent.offset + done)
            except OSError as e:
                raise WeightsError(
                    f"{extent.file}: cannot read expert {expert} of layer {layer} ({e.strerror})"
                ) from None
            if n == 0:
                raise WeightsError(f"{extent.file}: ended at byte {extent.offset + done} while reading expert {expert} "
                                   f"of layer {layer} (truncated after loading?)")  # fmt: skip
            done += n
        if self.cold:
            os.posix_fadvise(fd, extent.offset, extent.nbytes, os.POSIX_FADV_DONTNEED)
        return out

    def close(self) -> None:
        self._finalizer()


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    data = os.pread(fd, len(buffer), offset)  # macOS has no preadv in Python's os
    buffer[: len(data)] = data
    return len(data)


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def expert_template(extents: dict[str, list[Extent]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{parameter: (shape of one expert's part, safetensors dtype)} of a layer."""
    return {name: (parts[0].shape, parts[0].dtype) for name, parts in extents.items()}


def extent_bytes(template: dict[str, tuple[tuple[int, ...], str]]) -> int:
    return sum(math.prod(shape) * SAFETENSORS[code].nbytes for shape, code in template.values())
