"""`load(path_or_repo)`: a local MLX or Hugging Face directory, or a hub id, into a Model + Tokenizer."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_mixtral.cache import check_kv_quantization
from mlx_mixtral.config import ModelArgs, config_path, read_config
from mlx_mixtral.dtypes import compute_dtype
from mlx_mixtral.errors import ConfigError, LoadError, OptionError, WeightsError
from mlx_mixtral.experts import kernel_choice
from mlx_mixtral.memory.budget import wire_model_memory
from mlx_mixtral.model import HF_EXPERT_NAMES, Mixtral, sanitize
from mlx_mixtral.weights import (
    INDEX_NAME,
    TensorInfo,
    find_weight_files,
    read_headers,
    read_weight_map,
    tensor_mismatch,
)

if TYPE_CHECKING:
    from mlx_mixtral.memory.plan import MemoryPlan
    from mlx_mixtral.tokenizer import Tokenizer

# What a model needs from a hub repository; the weights are chosen once the index is known.
_HUB_METADATA = ["*.json", "*.jinja", "tokenizer.model", "tokenizer.model.v*", "*.tiktoken"]


def load(path_or_repo: str | Path, *, revision: str | None = None, **options: Any) -> tuple[Mixtral, Tokenizer]:
    """Load a model and its tokenizer from a local directory or a Hugging Face hub id; keyword
    options as for `load_planned_model` (dtype, kernels, max_memory, max_kv_size, expert_cache, ...)."""
    from mlx_mixtral.tokenizer import load_tokenizer

    model = load_planned_model(path_or_repo, revision=revision, **options)
    return model, load_tokenizer(model.model_dir)


def load_planned_model(
    path_or_repo: str | Path,
    *,
    dtype: mx.Dtype | None = None,
    revision: str | None = None,
    lazy: bool = False,
    kernels: str | None = None,
    max_memory: str | int | None = None,
    max_kv_size: int | None = None,
    expert_cache: str | float | int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    sequences: int = 1,
    memory_check: str = "plan",
    on_plan: Callable[[MemoryPlan], None] | None = None,
) -> Mixtral:
    """The model of a local directory or a Hugging Face hub id, loaded as its memory plan says.

    `dtype` is the compute dtype of everything not quantized (None: float32 on the CPU backend,
    whose quantized and gathered matmuls are fastest, or only work, in float32; the checkpoint's
    dtype on a GPU). `kernels` chooses the expert kernels ("auto", "fused", "builtin"; None:
    $MLX_MIXTRAL_KERNELS, else "auto"), see `Mixtral.set_kernels`; `model.kernels` says what runs.

    Memory: the memory plan (mlx_mixtral.memory.plan) is made first, from config.json and the
    safetensors headers only, so for a hub id before any weight is downloaded. A model that does not
    fit even with its experts offloaded is refused then (a LoadError saying what would fit); one that
    fits only in part loads with expert offloading (mlx_mixtral.offload: its experts are read from
    its own files when used). `model.memory_plan` is the plan. `max_memory` (bytes or "12GB")
    replaces the machine's budget, `max_kv_size` is the context the KV cache is counted for, and
    `expert_cache` ("30%", 0.3, or bytes such as "8GB") offloads with that much of the experts in
    memory whatever the plan says. `kv_bits` (4 or 8) makes `model.make_cache()` store keys
    and values quantized in groups of `kv_group_size` (the plan counts that size). `sequences` is
    how many KV caches the plan counts (a server's batch).
    memory_check="off" loads everything resident without a plan.
    `on_plan(plan)` is called once the plan is made and accepted, before anything is downloaded
    (the CLI prints its line).
    """
    from mlx_mixtral.memory.plan import plan
    from mlx_mixtral.offload.load import load_offloaded

    kernels = kernel_choice(kernels)  # a bad value fails before anything is downloaded
    check_kv_quantization(kv_bits, kv_group_size)
    if memory_check not in ("plan", "off"):
        raise OptionError(f"memory_check={memory_check!r}: expected 'plan' or 'off'", option="memory_check")
    memory_plan = None
    if memory_check == "plan" or expert_cache is not None:
        memory_plan = plan(
            path_or_repo,
            max_memory,
            max_kv_size,
            revision=revision,
            dtype=dtype,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            sequences=sequences,
        )
        if expert_cache is not None:
            memory_plan = memory_plan.with_expert_cache(expert_cache)
        elif memory_plan.decision == "refuse":
            raise LoadError(f"{path_or_repo}: {memory_plan.refusal()}")
        if on_plan is not None:
            on_plan(memory_plan)
    model_dir = resolve_model_dir(path_or_repo, revision=revision)
    if memory_plan is not None and memory_plan.decision == "offload":
        model = load_offloaded(model_dir, memory_plan.layer_slots(), dtype=dtype, kernels=kernels)
    else:
        model = load_model(model_dir, dtype=dtype, lazy=lazy, kernels=kernels)
    check_kv_quantization(kv_bits, kv_group_size, model.args.head_dim)
    model.memory_plan = memory_plan
    model.model_dir = model_dir
    model.kv_bits, model.kv_group_size = kv_bits, kv_group_size
    return model


def resolve_model_dir(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise download (or find in the hub cache) only the files a
    model needs. Honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE through huggingface-hub
    (see `local_or_hub` for which it is)."""
    where = local_or_hub(path_or_repo)
    if isinstance(where, Path):
        return where
    try:
        return _resolve_hub_id(where, revision)
    except LoadError as e:  # the user may have meant a directory of that name
        raise LoadError(f"{e}; there is no local directory {where!r} either") from None


def local_or_hub(path_or_repo: str | Path) -> Path | str:
    """The one rule for local vs hub: what looks like a path (a Path, or text starting with '.',
    '/' or '~', or naming something that exists) is local, and must be a directory (returned as a
    Path); otherwise an `org/name` is a hub id (returned as text); anything else is neither."""
    path = Path(os.path.expanduser(path_or_repo))  # "~nope" stays as is where Path would raise
    name = str(path_or_repo)
    if path.is_dir():
        return path
    if isinstance(path_or_repo, Path) or name.startswith((".", "/", "~")) or os.path.lexists(path):
        what = "not a directory" if os.path.lexists(path) else "no such directory"
        raise LoadError(f"{name}: {what}")
    if not re.fullmatch(r"[\w\-][\w.\-]*/[\w\-][\w.\-]*", name):
        raise LoadError(f"{name}: no such directory, and not a hub id of the form 'org/name'")
    return name


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
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError) as e:
        raise hub_error(repo, revision, e) from None


def hub_error(repo: str, revision: str | None, error: Exception) -> LoadError:
    """The one-line LoadError for a failed hub request (huggingface_hub's error types)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return LoadError(
            f"{repo}: gated repository; accept its license on huggingface.co and log in (huggingface-cli login)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return LoadError(f"{repo}: no such repository on the hub (or it is private)")
    if isinstance(error, RevisionNotFoundError):
        return LoadError(f"{repo}: revision {revision!r} not found")
    if isinstance(error, HFValidationError):  # the hub's own rules for names (no '--', no '.' at either end, ...)
        return LoadError(f"{repo}: not a valid hub id")
    if isinstance(error, LocalEntryNotFoundError):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        return LoadError(
            f"{repo}: not in the local hub cache and {why}; download it once online or pass a local directory"
        )
    return LoadError(f"{repo}: the hub answered {' '.join(str(error).split())[:200]}")


def load_model(
    model_dir: str | Path,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    kernels: str | None = None,
) -> Mixtral:
    """Build the model a directory describes and load its checked weights into it, all resident
    (`load` first asks the memory planner whether they fit)."""
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
    fill_model(model, weights, headers, model_dir, dtype=dtype, lazy=lazy, kernels=kernels)
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
    kernels: str | None = None,
) -> None:
    """Quantize `model` like the checkpoint, check the (sanitized) weights against it, cast them
    to the compute dtype and load them (see shape_model and install_weights)."""
    shape_model(model, weights, headers, model_dir)
    install_weights(model, weights, dtype=dtype or default_dtype(weights), lazy=lazy)
    finish_model(model, kernels)


def shape_model(model: Mixtral, weights: dict[str, mx.array], headers: dict[str, TensorInfo], model_dir: Path) -> None:
    """Swap in quantized layers like the checkpoint's and check every tensor against the model.
    Reads no data: `weights` may hold lazy placeholders."""
    quantize_like_checkpoint(model, weights, model.args.quantization or {})
    check_against_model(model, weights, headers, model_dir)


def install_weights(model: Mixtral, weights: dict[str, mx.array], *, dtype: mx.Dtype, lazy: bool = False) -> None:
    """Cast floating-point tensors to `dtype` and load them into `model` (all of them or a part).
    Each tensor is evaluated on its own and replaced in `weights`, so the uncast copy is freed
    before the next one is read."""
    for name, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
            weights[name] = value.astype(dtype)
    if not lazy:
        for value in weights.values():
            mx.eval(value)
    model.update(tree_unflatten(list(weights.items())))


def finish_model(model: Mixtral, kernels: str | None, extra_wired: int = 0) -> None:
    model.eval()
    model.set_kernels(kernels)
    wire_model_memory(model, extra_wired)


def default_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """The compute dtype of a checkpoint's (sanitized) weights; see dtypes.compute_dtype."""
    return compute_dtype(
        [v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating) and k.endswith("weight")]
    )


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


def source_tensors(headers: dict[str, TensorInfo], args: ModelArgs, model_dir: Path) -> dict[str, list[str]]:
    """Model parameter name -> the checkpoint tensors it is made of: one, or one per expert (in
    expert order) for a Hugging Face layout that `sanitize` stacks.

    The mapping comes from the model's own `sanitize`, run on placeholders that carry each tensor's
    index (0-d arrays; stacking them gives the expert order), so the name mapping exists only once."""
    names = sorted(headers)
    native = next((n for n in names if not n.startswith(("model.", "lm_head."))), None)
    if native is not None:
        raise LoadError(
            f"{model_dir}: Mistral-native tensor names (e.g. {native!r}); reading part of the weights "
            f"(distributed loading, expert offloading) needs a Hugging Face or MLX layout, convert it first "
            f"with `mlx-mixtral convert`"
        )
    marks = {n: mx.array(i) for i, n in enumerate(names)}
    try:
        mapped = sanitize(marks, args)
    except WeightsError as e:
        raise LoadError(f"{model_dir}: {e}") from None
    return {
        final: [names[i] for i in np.array(mark).reshape(-1).tolist()] if mark.ndim else [names[mark.item()]]
        for final, mark in mapped.items()
    }
