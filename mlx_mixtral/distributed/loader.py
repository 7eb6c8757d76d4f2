"""Load one rank's part of a model: read only that part's bytes from the shared model directory.

Works on the layouts `load_model` reads from safetensors: MLX (stacked experts, maybe quantized,
as written by our converter, mlx-lm or the mlx-community hub) and Hugging Face (one tensor per
expert). Each tensor is read with positioned reads from the file (safetensors: 8-byte header
length, JSON header, raw row-major data; https://github.com/huggingface/safetensors), never
memory-mapped whole, so a rank's resident memory is its share plus one read buffer.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_mixtral.distributed.sharding import plan_shards, shard_modules
from mlx_mixtral.dtypes import SAFETENSORS
from mlx_mixtral.errors import LoadError, WeightsError
from mlx_mixtral.loader import fill_model, read_model_dir, source_tensors
from mlx_mixtral.model import Mixtral
from mlx_mixtral.weights import TensorInfo

# Column slices are read a block of whole rows at a time; this bounds that block.
READ_BLOCK_BYTES = 64 << 20


def _read_into(f, offset: int, out: np.ndarray) -> None:
    view = memoryview(out).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise WeightsError(f"{f.name}: file ended while reading tensor data at byte {offset + done}")
        done += n


def read_slice(info: TensorInfo, spec: tuple[int, int, int] | None) -> mx.array:
    """Tensor `info`, or only rows (axis -2) / columns (axis -1) start:stop of its last two dims
    (leading dims, e.g. stacked experts, are kept whole), reading no other rows from disk."""
    storage = SAFETENSORS.get(info.dtype)
    if storage is None or storage.numpy is None:
        raise WeightsError(f"{info.file}: dtype {info.dtype} cannot be loaded here")
    dtype = np.dtype(storage.numpy)
    shape = info.shape
    with open(info.file, "rb", buffering=0) as f:
        if spec is None:
            out = np.empty(shape, dtype)
            _read_into(f, info.start, out)
        else:
            axis, start, stop = spec
            *lead, rows, cols = shape
            blocks = math.prod(lead)
            row_bytes = cols * dtype.itemsize
            if axis == -2:
                out = np.empty((blocks, stop - start, cols), dtype)
                for b in range(blocks):  # one contiguous run of rows per expert
                    _read_into(f, info.start + (b * rows + start) * row_bytes, out[b])
            else:
                out = np.empty((blocks, rows, stop - start), dtype)
                step = max(1, READ_BLOCK_BYTES // row_bytes)
                buf = np.empty((min(step, rows), cols), dtype)
                for b in range(blocks):
                    for r in range(0, rows, step):
                        n = min(step, rows - r)
                        _read_into(f, info.start + (b * rows + r) * row_bytes, buf[:n])
                        out[b, r : r + n] = buf[:n, start:stop]
            out = out.reshape(*lead, *out.shape[1:])
    array = mx.array(out)
    return array.view(mx.bfloat16) if info.dtype == "BF16" else array


def load_sharded(
    model_dir: str | Path,
    group: mx.distributed.Group,
    *,
    dtype: mx.Dtype | None = None,
    kernels: str | None = None,
) -> Mixtral:
    """This rank's part of the model in `model_dir` (see sharding.py for the split), with the same
    checks and dtype rules as `load_model`. The plan is at `model.shard_plan`."""
    model_dir = Path(model_dir)
    args, _, headers = read_model_dir(model_dir)
    sources = source_tensors(headers, args, model_dir)
    # `sanitize` renames only the per-expert tensors it stacks (source_tensors refuses native names).
    shapes = {name: (() if src == [name] else (len(src),)) + headers[src[0]].shape for name, src in sources.items()}
    plan = plan_shards(args, group.size(), shapes)
    rank = group.rank()

    weights: dict[str, mx.array] = {}
    try:
        for name, src in sources.items():
            spec = plan.slice_of(name, shapes[name], rank)
            parts = [read_slice(headers[s], spec) for s in src]
            weights[name] = parts[0] if src == [name] else mx.stack(parts)  # (E, ...) even for E = 1
            mx.eval(weights[name])  # one tensor at a time: the parts are freed before the next read
    except WeightsError as e:
        raise LoadError(str(e)) from None

    model = Mixtral(args)
    shard_modules(model, plan, rank, group)
    fill_model(model, weights, headers, model_dir, dtype=dtype, lazy=False, kernels=kernels)
    model.shard_plan = plan
    return model
