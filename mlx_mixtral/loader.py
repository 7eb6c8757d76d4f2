"""`load(path_or_repo)`: a local MLX or Hugging Face directory, or a hub id, into a Model + Tokenizer."""

from __future__ import annotations

import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_mixtral.config import ModelArgs, config_path, read_config
from mlx_mixtral.errors import ConfigError, LoadError, WeightsError
from mlx_mixtral.experts import kernel_choice
from mlx_mixtral.model import HF_EXPERT_NAMES, Mixtral, sanitize
from mlx_mixtral.weights import (
    INDEX_NAME,
    TensorInfo,
    find_weight_files,
    read_headers,
    read_weight_map,
    tensor_mismatch,
)

# What a model needs from a hub repository; the weights are chosen once the index is known.
_HUB_METADATA = ["*.json", "*.jinja", "tokenizer.model", "tokenizer.model.v*", "*.tiktoken"]


def load(
    path_or_repo: str | Path,
    *,
    dtype: mx.Dtype | None = None,
    revision: str | None = None,
    lazy: bool = False,
    memory_check: str = "warn",
    kernels: str | None = None,
):
    """Load a model and its tokenizer from a local directory or a Hugging Face hub id.

    `dtype` is the compute dtype of everything not quantized (None: float32 on the CPU backend,
    whose quantized and gathered matmuls are fastest, or only work, in float32; the checkpoint's
    dtype on a GPU). `memory_check` is "warn", "error" or "off". `kernels` chooses the expert
    kernels ("auto", "fused", "builtin"; None: $MLX_MIXTRAL_KERNELS, else "auto"), see
    `Mixtral.set_kernels`; `model.kernels` says what runs.
    """
    kernels = kernel_choice(kernels)  # a bad value fails before anything is downloaded
    from mlx_mixtral.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(path_or_repo, revision=revision)
    model = load_model(model_dir, dtype=dtype, lazy=lazy, memory_check=memory_check, kernels=kernels)
    return model, load_tokenizer(model_dir)


def resolve_model_dir(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise download (or find in the hub cache) only the files a
    model needs. Honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE through huggingface-hub.

    The rule: what looks like a path (a Path, or text starting with '.', '/' or '~', or naming
    something that exists) is local, and must be a directory. Otherwise `org/name` is a hub id;
    anything else is neither."""
    path = Path(os.path.expanduser(path_or_repo))  # "~nope" stays as is where Path would raise
    name = str(path_or_repo)
    if path.is_dir():
        return path
    if isinstance(path_or_repo, Path) or name.startswith((".", "/", "~")) or os.path.lexists(path):
        what = "not a directory" if os.path.lexists(path) else "no such directory"
        raise LoadError(f"{name}: {what}")
    if not re.fullmatch(r"[\w\-][\w.\-]*/[\w\-][\w.\-]*", name):
        raise LoadError(f"{name}: no such directory, and not a hub id of the form 'org/name'")
    try:
        return _resolve_hub_id(name, revision)
    except LoadError as e:  # the user may have meant a directory of that name
        raise LoadError(f"{e}; there is no local directory {name!r} either") from None


def _resolve_hub_id(repo: str, revision: str | None) -> Path:
    meta_dir = _snapshot(repo, revision, _HUB_METADATA)
    index = meta_dir / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(read_weight_map(index).values()))
        except WeightsError as e:
            raise LoadError(str(e)) from None
        return _snapshot(repo, revision, shards)
    model_dir = _snapshot(repo, revision, ["model*.safetensors"])
    if not any(model_dir.glob("model*.safetensors")):
        model_dir = _snapshot(repo, revision, ["consolidated*.safetensors"])
    return model_dir


def _snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise LoadError(
            f"{repo}: not in the local hub cache and {why}; download it once online or pass a local directory"
        ) from None
    except GatedRepoError:
        raise LoadError(
            f"{repo}: gated repository; accept its license on huggingface.co and log in (huggingface-cli login)"
        ) from None
    except RepositoryNotFoundError:
        raise LoadError(f"{repo}: no such repository on the hub (or it is private)") from None
    except RevisionNotFoundError:
        raise LoadError(f"{repo}: revision {revision!r} not found") from None
    except HFValidationError:  # the hub's own rules for names (no '--', no '.' at either end, ...)
        raise LoadError(f"{repo}: not a valid hub id") from None
    except HfHubHTTPError as e:
        raise LoadError(f"{repo}: the hub answered {' '.join(str(e).split())[:200]}") from None


def load_model(
    model_dir: str | Path,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    memory_check: str = "warn",
    kernels: str | None = None,
) -> Mixtral:
    """Build the model a directory describes and load its checked weights into it."""
    model_dir = Path(model_dir)
    args, files, headers = read_model_dir(model_dir)
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))  # lazy: data is read when evaluated
    try:
        weights = sanitize(weights, args)
    except WeightsError as e:
        raise LoadError(f"{model_dir}: {e}") from None

    model = Mixtral(args)
    fill_model(model, weights, headers, model_dir, dtype=dtype, lazy=lazy, memory_check=memory_check, kernels=kernels)
    return model


def read_model_dir(model_dir: Path) -> tuple[ModelArgs, list[Path], dict[str, TensorInfo]]:
    """The config, weight files and checked safetensors headers of a model directory."""
    try:
        args = ModelArgs.from_dict(read_config(model_dir))
        files = find_weight_files(model_dir)
        return args, files, read_headers(files)
    except (ConfigError, WeightsError) as e:
        raise LoadError(str(e)) from None


def fill_model(
    model: Mixtral,
    weights: dict[str, mx.array],
    headers: dict[str, TensorInfo],
    model_dir: Path,
    *,
    dtype: mx.Dtype | None,
    lazy: bool,
    memory_check: str,
    kernels: str | None = None,
) -> None:
    """Quantize `model` like the checkpoint, check the (sanitized) weights against it, cast them
    to the compute dtype and load them. Each tensor is evaluated on its own and replaced in
    `weights`, so the uncast copy is freed before the next one is read."""
    quantize_like_checkpoint(model, weights, model.args.quantization or {})
    check_against_model(model, weights, headers, model_dir)
    dtype = dtype or default_dtype(weights)
    for name, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
            weights[name] = value.astype(dtype)
    check_memory(sum(v.nbytes for v in weights.values()), model_dir, memory_check)
    if not lazy:
        for value in weights.values():
            mx.eval(value)
    model.update(tree_unflatten(list(weights.items())))
    model.eval()
    model.set_kernels(kernels)
    wire_model_memory(model)


def default_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """float32 on the CPU backend (measured with mlx 0.32: its quantized matmul is ~8x faster with float32
    scales than bfloat16, and gather_mm accepts only float32); the checkpoint's float dtype
    (usually bfloat16 or float16, the fast types on Apple GPUs) elsewhere."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    floats = [v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating) and k.endswith("weight")]
    return max(set(floats), key=floats.count) if floats else mx.float16


def quantize_like_checkpoint(model: nn.Module, weights: dict[str, Any], quantization: dict[str, Any]) -> None:
    """Swap in quantized layers wherever the checkpoint holds `<module>.scales`.

    Bits and group size are read off the tensor shapes (packed width and scale count), so
    per-module mixed precision loads even if config.json lists only some overrides; the mode
    (affine, mxfp4, mxfp8, nvfp4) comes from the per-module entry or the top-level default.
    """
    default_mode = quantization.get("mode", "affine")

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        mode = override.get("mode", default_mode) if isinstance(override, dict) else default_mode
        in_dims = module.weight.shape[-1]
        packed, scales = weights[f"{path}.weight"].shape[-1], weights[f"{path}.scales"].shape[-1]
        if in_dims % scales or (packed * 32) % in_dims:
            raise LoadError(
                f"{path}: quantized shapes weight {weights[f'{path}.weight'].shape} / scales "
                f"{weights[f'{path}.scales'].shape} do not fit input size {in_dims}"
            )
        return {"group_size": in_dims // scales, "bits": packed * 32 // in_dims, "mode": mode}

    nn.quantize(model, class_predicate=predicate)


_HF_EXPERT_OF_PROJ = {proj: w for w, proj in HF_EXPERT_NAMES.items()}


def _source_file(name: str, headers: dict) -> str:
    """The file a (possibly stacked) tensor came from, for error messages."""
    candidates = [name]
    stacked = re.fullmatch(r"(.+)\.switch_mlp\.(\w+)\.(\w+)", name)
    if stacked:
        candidates.append(f"{stacked[1]}.experts.0.{_HF_EXPERT_OF_PROJ.get(stacked[2], stacked[2])}.{stacked[3]}")
    for candidate in candidates:
        if candidate in headers:
            return headers[candidate].file.name
    return "the checkpoint"


def check_against_model(model: Mixtral, weights: dict[str, mx.array], headers: dict, model_dir: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise LoadError(
            f"{model_dir}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    shapes = {name: tuple(v.shape) for name, v in expected.items()}
    config_name = config_path(model_dir).name
    for name in sorted(weights):
        problem = tensor_mismatch(name, tuple(weights[name].shape), shapes, model.args.model_type, config_name)
        if problem:
            raise LoadError(f"{model_dir / _source_file(name, headers)}: {problem}")


def _physical_memory() -> tuple[int, int | None]:
    """(total bytes, available bytes or None) of this machine."""
    if mx.metal.is_available():
        info = mx.device_info()
        return int(info["max_recommended_working_set_size"]), None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = None
    return total, avail


def check_memory(needed: int, model_dir: Path, mode: str = "warn") -> None:
    """Refuse a model larger than the machine's memory; warn when it exceeds what is free now."""
    if mode == "off":
        return
    total, avail = _physical_memory()
    gb = 1024**3
    if needed > total:
        msg = (
            f"{model_dir}: model needs {needed / gb:.1f} GiB but this machine has {total / gb:.1f} GiB "
            f"usable; use a smaller quantization"
        )
        raise LoadError(msg)
    if avail is not None and needed > avail:
        msg = f"{model_dir}: model needs {needed / gb:.1f} GiB, only {avail / gb:.1f} GiB free now; expect swapping"
        if mode == "error":
            raise LoadError(msg)
        warnings.warn(msg, ResourceWarning, stacklevel=3)


def wire_model_memory(model: Mixtral) -> None:
    """On Apple GPUs, wire as much memory as the model's weights (plus headroom for the cache and
    activations), not the whole machine, while this model lives; restore the old limit after."""
    if not mx.metal.is_available():
        return
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    ceiling = int(mx.device_info()["max_recommended_working_set_size"])
    limit = min(ceiling, int(weights_bytes * 1.1) + (1 << 30))
    previous = mx.set_wired_limit(limit)
    weakref.finalize(model, mx.set_wired_limit, previous)
