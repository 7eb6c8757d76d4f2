"""Finding and validating the safetensors files of a model directory.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to {dtype, shape, data_offsets}, then the raw bytes (https://github.com/huggingface/safetensors).
Reading only the header lets us name the broken file and tensor before any data is touched.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlx_mixtral.dtypes import SAFETENSORS
from mlx_mixtral.errors import WeightsError

INDEX_NAME = "model.safetensors.index.json"

# Header sizes above this are not a model header but a corrupt length field.
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header; raise WeightsError naming file and tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise WeightsError(
                    f"{path}: corrupt or truncated safetensors header (claims {header_len} bytes, file has {size})"
                )
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if end - start != math.prod(shape) * SAFETENSORS[dtype].nbytes:
            raise WeightsError(
                f"{path}: tensor {name!r} byte range {start}..{end} does not match shape {list(shape)} of {dtype}"
            )
        if base + end > size:
            raise WeightsError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {base + end} "
                f"but the file has {size} (incomplete download?)"
            )
        tensors[name] = TensorInfo(path, dtype, shape, base + start, base + end)
    return tensors


def tensor_mismatch(
    name: str, shape: tuple[int, ...], expected: Mapping[str, tuple[int, ...]], model_type: str, config_name: str
) -> str | None:
    """What is wrong with a (sanitized) tensor for a model whose parameters have the `expected`
    shapes, or None: it is not one of them, or its shape is not the one the config implies."""
    if name not in expected:
        return f"unexpected tensor {name!r} (not part of a {model_type} model with this config)"
    if tuple(shape) != tuple(expected[name]):
        return f"tensor {name!r} has shape {list(shape)}, {config_name} implies {list(expected[name])}"
    return None


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The tensor name -> shard file map of a `model.safetensors.index.json`."""
    try:
        return json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise WeightsError(f"{index_path}: corrupt index (expected JSON with a 'weight_map' object)") from None


def find_weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files holding a model: those named by the index if there is one,
    else `model*.safetensors`, else Mistral's `consolidated*.safetensors`."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        weight_map = read_weight_map(index_path)
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                missing = next(t for t, n in weight_map.items() if model_dir / n == f)
                raise WeightsError(
                    f"{index_path}: names shard {f.name!r} (holding e.g. {missing!r}) which does not exist"
                )
        return files
    for pattern in ("model*.safetensors", "consolidated*.safetensors"):
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise WeightsError(f"{model_dir}: no model*.safetensors or consolidated*.safetensors weight files")


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """All tensors of a model by name; a name in two files is an error (it would be ambiguous)."""
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise WeightsError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    index_path = files[0].parent / INDEX_NAME if files else None
    if index_path is not None and index_path.is_file():
        for name, shard in read_weight_map(index_path).items():
            if name not in tensors:
                raise WeightsError(f"{index_path}: tensor {name!r} is mapped to {shard!r} but is not in it")
    return tensors
