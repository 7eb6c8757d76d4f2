"""A checkpoint to convert: where it is, what it holds, and its tensors one layer at a time.

Everything here reads only config files and safetensors headers, so a broken file is reported
(one line, naming it) before any weight is touched. Tensors come back as lazy `mx.array`s
(`mx.load` of a safetensors file reads a tensor's bytes only when it is evaluated).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_mixtral.config import ModelArgs, is_native_params, read_config
from mlx_mixtral.dtypes import SAFETENSORS
from mlx_mixtral.errors import ConfigError, ConvertError, LoadError, WeightsError
from mlx_mixtral.loader import resolve_model_dir
from mlx_mixtral.weights import TensorInfo, find_weight_files, read_headers

# Packed weights of an MLX-quantized checkpoint, and the 8-bit shared scales of mxfp4/mxfp8/nvfp4.
_PACKED_DTYPES = {"U32": ".weight", "U8": ".scales"}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(embed_tokens|tok_embeddings)\.")


@dataclass
class Source:
    path: Path  # local directory (a hub snapshot for hub ids)
    repo_id: str | None  # the hub id it came from, if any
    config: dict[str, Any]  # config.json, or params.json for Mistral's native layout
    args: ModelArgs
    tensors: dict[str, TensorInfo]

    @property
    def native(self) -> bool:
        """Mistral's own layout (params.json + consolidated*.safetensors)."""
        return is_native_params(self.config)

    @property
    def quantized(self) -> bool:
        return any(name.endswith(".scales") for name in self.tensors)

    @property
    def float_dtype(self) -> mx.Dtype:
        """The most common floating dtype of the stored tensors (bfloat16 if there is none)."""
        counts = Counter(info.dtype for info in self.tensors.values() if SAFETENSORS[info.dtype].is_float)
        return SAFETENSORS[counts.most_common(1)[0][0]].mlx if counts else mx.bfloat16

    def groups(self) -> list[tuple[str, list[str]]]:
        """Tensor names by layer, in model order: embeddings, layers 0..N-1, then the rest
        (final norm, lm_head). Converting group by group bounds memory to about one layer."""
        by_key: dict[tuple[int, int], list[str]] = {}
        for name in self.tensors:
            layer = _LAYER.search(name)
            if layer:
                key = (1, int(layer[1]))
            else:
                key = (0, 0) if _EMBEDDING.search(name) else (2, 0)
            by_key.setdefault(key, []).append(name)
        labels = {0: "embeddings", 2: "final norm and lm_head"}
        return [(labels.get(k[0], f"layer {k[1]}"), sorted(by_key[k])) for k in sorted(by_key)]

    def load(self, names: list[str]) -> dict[str, mx.array]:
        """Lazy arrays for the given tensor names (nothing is read until evaluated)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out = {}
        for file, wanted in by_file.items():
            arrays = mx.load(str(file))
            out.update((name, arrays[name]) for name in wanted)
        return out


def open_source(path_or_repo: str | Path, revision: str | None = None) -> Source:
    """Resolve a local directory or hub id and check its config and every weight header."""
    local = Path(os.path.expanduser(path_or_repo))
    try:
        path = resolve_model_dir(path_or_repo, revision=revision)
        config = read_config(path)
        args = ModelArgs.from_dict(config)
        tensors = read_headers(find_weight_files(path))
    except (ConfigError, WeightsError, LoadError) as e:
        raise ConvertError(str(e)) from None
    _check_dtypes(tensors)
    return Source(path, None if local.is_dir() else str(path_or_repo), config, args, tensors)


def _check_dtypes(tensors: dict[str, TensorInfo]) -> None:
    for name, info in tensors.items():
        if SAFETENSORS[info.dtype].is_float:
            continue
        suffix = _PACKED_DTYPES.get(info.dtype)
        if suffix and name.endswith(suffix):
            module = name[: -len(suffix)]
            if f"{module}.scales" in tensors:
                continue
        raise ConvertError(
            f"{info.file}: tensor {name!r} has dtype {info.dtype}, which cannot be converted "
            f"(expected F32, F16 or BF16, or an MLX-quantized U32 weight with scales)"
        )
