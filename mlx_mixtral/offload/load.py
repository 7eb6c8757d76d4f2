"""Building a model whose experts are offloaded: the non-expert weights are loaded as usual, each
MoE layer gets its expert slots (the first experts read in to start warm), and the experts' byte
ranges in the model's files are noted for later reads."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_mixtral.dtypes import SAFETENSORS
from mlx_mixtral.errors import LoadError
from mlx_mixtral.experts import QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from mlx_mixtral.loader import (
    default_dtype,
    finish_model,
    install_weights,
    read_model_dir,
    shape_model,
    source_tensors,
)
from mlx_mixtral.model import Mixtral, weight_part
from mlx_mixtral.offload.cache import LayerCache
from mlx_mixtral.offload.policy import DEFAULT_POLICY, POLICIES
from mlx_mixtral.offload.store import ExpertStore, expert_extents
from mlx_mixtral.offload.switch import ExpertOffload, OffloadedSwitchGLU

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def load_offloaded(
    model_dir: str | Path,
    layer_slots: list[int],
    *,
    dtype: mx.Dtype | None = None,
    kernels: str | None = None,
    policy: str = DEFAULT_POLICY,
    prefetch: bool = True,
    cold: bool = False,
) -> Mixtral:
    """The model in `model_dir` with `layer_slots[i]` expert slots in MoE layer i (>= 1 each).
    `model.offload` holds the caches and their statistics."""
    model_dir = Path(model_dir)
    args, files, headers = read_model_dir(model_dir)
    if not args.is_moe:
        raise LoadError(f"{model_dir}: a dense model has no experts to offload")
    if len(layer_slots) != args.num_hidden_layers or min(layer_slots) < 1:
        raise LoadError(f"expert slots {layer_slots} must give each of {args.num_hidden_layers} layers at least one")
    if policy not in POLICIES:
        raise LoadError(f"unknown eviction policy {policy!r} (expected one of: {', '.join(POLICIES)})")
    sources = source_tensors(headers, args, model_dir)
    experts = {name: src for name, src in sources.items() if weight_part(name) == "experts"}
    arrays = {f: mx.load(str(f)) for f in files}  # lazy: nothing is read until evaluated
    weights = {name: arrays[headers[src[0]].file][src[0]] for name, src in sources.items() if name not in experts}
    # Shape-only stand-ins for the stacked experts: quantize_like_checkpoint and the checks read
    # shapes only, and a lazy array that is never evaluated allocates nothing.
    stand_ins = {name: mx.zeros(_stacked_shape(src, headers), SAFETENSORS[headers[src[0]].dtype].mlx)
                 for name, src in experts.items()}  # fmt: skip
    model = Mixtral(args)
    shape_model(model, {**weights, **stand_ins}, headers, model_dir)
    compute = dtype or default_dtype({**weights, **stand_ins})

    store = ExpertStore(_extents(experts, headers, args.num_local_experts), cold=cold)
    caches, routers = [], []
    offload = ExpertOffload(store, caches, routers, prefetch=prefetch, top_k=args.num_experts_per_tok)
    for i, layer in enumerate(model.layers):
        moe = layer.block_sparse_moe
        stored = {name: parts[0].dtype for name, parts in store.extents[i].items()}
        slots = _slot_layers(moe.switch_mlp, layer_slots[i], stored, compute)
        caches.append(LayerCache(i, args.num_local_experts, slots, layer_slots[i], POLICIES[policy]()))
        routers.append(moe.gate)
        moe.switch_mlp = OffloadedSwitchGLU(slots, i, offload)
    install_weights(model, weights, dtype=compute)
    for cache in caches:  # start warm: the first experts of every layer
        for e in range(min(cache.num_slots, args.num_local_experts)):
            arrays = store.read(cache.layer, e)
            cache.place(e, arrays, keep=set())
            store.release(arrays)
    model.offload = offload
    finish_model(model, kernels)
    return model


def _stacked_shape(sources: list[str], headers) -> tuple[int, ...]:
    shape = headers[sources[0]].shape
    return shape if len(sources) == 1 else (len(sources), *shape)


def _extents(experts: dict[str, list[str]], headers, num_experts: int) -> dict[int, dict]:
    """MoE layer -> {"gate_proj.weight": per-expert extents, ...}."""
    out: dict[int, dict] = {}
    for name, src in experts.items():
        # model.layers.{i}.block_sparse_moe.switch_mlp.{proj}.{kind}
        parts = name.split(".")
        out.setdefault(int(parts[2]), {})[f"{parts[-2]}.{parts[-1]}"] = expert_extents(src, headers, num_experts)
    return out


def _slot_layers(template: SwitchGLU, num_slots: int, stored: dict[str, str], compute: mx.Dtype) -> SwitchGLU:
    """A SwitchGLU like `template` (each projection quantized the same way) holding `num_slots`
    experts, zero-filled; `stored` gives each parameter's safetensors dtype ("gate_proj.scales": "BF16"):
    floating-point ones are held at the compute dtype, packed ones as stored. The constructors'
    random weights are lazy and replaced unevaluated."""
    d_in, f = _dims(template.gate_proj)
    slots = SwitchGLU(d_in, f, num_slots)
    for proj in _PROJECTIONS:
        layer = getattr(template, proj)
        n_in, n_out = _dims(layer)
        if isinstance(layer, QuantizedSwitchLinear):
            new = QuantizedSwitchLinear(n_in, n_out, num_slots, layer.group_size, layer.bits, layer.mode)
            for kind in ("weight", "scales", "biases"):
                code = stored.get(f"{proj}.{kind}")
                if code is None:
                    new.pop(kind, None)
                    continue
                dtype = compute if SAFETENSORS[code].is_float else SAFETENSORS[code].mlx
                new[kind] = mx.zeros((num_slots, *layer[kind].shape[1:]), dtype)
        else:
            new = SwitchLinear(n_in, n_out, num_slots)
            new.weight = mx.zeros((num_slots, n_out, n_in), compute)
        setattr(slots, proj, new)
    mx.eval(slots.parameters())
    return slots


def _dims(layer: SwitchLinear | QuantizedSwitchLinear) -> tuple[int, int]:
    """(input, output) size of a stacked expert projection."""
    if isinstance(layer, QuantizedSwitchLinear):
        return layer.scales.shape[-1] * layer.group_size, layer.scales.shape[-2]
    return layer.weight.shape[-1], layer.weight.shape[-2]
