"""Streaming safetensors shards whose layout is fixed before any data is computed.

The converter first builds every output tensor lazily (shapes and dtypes are known without
evaluating anything), so all shard headers can be written up front and each tensor's bytes
appended the moment it is computed. Nothing ever holds a whole shard in memory.

safetensors layout (https://github.com/huggingface/safetensors): u64 little-endian header
length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{...}} (may be padded with spaces), then the tensors' bytes back to back with no gaps.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx

from mlx_mixtral.dtypes import SAFETENSORS_CODE
from mlx_mixtral.errors import ConvertError, OptionError
from mlx_mixtral.memory.budget import parse_bytes
from mlx_mixtral.weights import INDEX_NAME


def parse_size(size: str | int) -> int:
    """Bytes in "500MB", "5GB", "1.5GiB" or a plain integer (see memory.budget.parse_bytes)."""
    try:
        return parse_bytes(size, "shard size")
    except OptionError as e:
        raise ConvertError(str(e)) from None


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: mx.Dtype
    shape: tuple[int, ...]
    nbytes: int


def assign_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Consecutive tensors fill a shard up to max_bytes; a tensor is never split, so one larger
    than the limit gets a shard of its own."""
    shards: list[list[Entry]] = []
    size = 0
    for e in entries:
        if not shards or (size + e.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """mlx-lm's (and transformers') file names."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(entries: list[Entry]) -> bytes:
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": SAFETENSORS_CODE[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned for memory-mapped readers
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes planned tensors in plan order into `directory`, one shard file after another."""

    def __init__(self, directory: Path, entries: list[Entry], max_bytes: int):
        unknown = [e for e in entries if e.dtype not in SAFETENSORS_CODE]
        if unknown:
            raise ConvertError(
                f"tensor {unknown[0].name!r} has dtype {unknown[0].dtype}, which safetensors "
                f"output does not support here"
            )
        self.directory = directory
        self.shards = assign_shards(entries, max_bytes)
        self.names = shard_names(len(self.shards))
        self.total_bytes = sum(e.nbytes for e in entries)
        self.bytes_written = 0
        self._queue = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._file_index = -1

    def write(self, name: str, array: mx.array) -> None:
        """Append one evaluated, row-contiguous array; it must be the next one planned."""
        if self._next >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} was not planned")
        shard, entry = self._queue[self._next]
        if (name, array.dtype, tuple(array.shape)) != (entry.name, entry.dtype, entry.shape):
            raise RuntimeError(
                f"tensor {name!r} {array.dtype}{list(array.shape)} differs from the plan "
                f"({entry.name!r} {entry.dtype}{list(entry.shape)})"
            )
        if shard != self._file_index:
            self._open(shard)
        self._file.write(memoryview(array))
        self._next += 1
        self.bytes_written += entry.nbytes

    def _open(self, shard: int) -> None:
        self._close_file()
        self._file = open(self.directory / self.names[shard], "wb")
        self._file.write(_header(self.shards[shard]))
        self._file_index = shard

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self, total_parameters: int) -> None:
        """Finish the last shard and write model.safetensors.index.json."""
        self._close_file()
        if self._next != len(self._queue):
            raise RuntimeError(f"tensor {self._queue[self._next][1].name!r} was planned but never written")
        weight_map = {e.name: self.names[i] for i, shard in enumerate(self.shards) for e in shard}
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": total_parameters},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=4) + "\n")

    def abort(self) -> None:
        self._close_file()
