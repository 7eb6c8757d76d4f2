"""From one group of source tensors (a layer) to output tensors, module by module, lazily.

`mlx_mixtral.model.sanitize` maps the names (HF, Mistral-native, MLX) and stacks the experts;
this file decides each module's precision and builds the (lazy) output arrays. The planning
pass only reads their shapes; the writing pass evaluates one module at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_mixtral.config import config_path
from mlx_mixtral.convert.quant import QuantPlan
from mlx_mixtral.convert.shards import Entry
from mlx_mixtral.convert.source import Source
from mlx_mixtral.errors import ConvertError, LoadError, WeightsError
from mlx_mixtral.loader import quantize_like_checkpoint
from mlx_mixtral.model import Mixtral, sanitize
from mlx_mixtral.weights import tensor_mismatch

# What a module's output is: a quantization dict, False (quantizable but kept in floating
# point), or None (not a quantizable module, e.g. a norm).
Decision = dict | bool | None


@dataclass
class Context:
    source: Source
    plan: QuantPlan | None  # None: keep floating point modules as they are
    dtype: mx.Dtype | None  # cast floating point tensors to this (None: keep each one's dtype)
    requantize: bool  # dequantize an MLX source's quantized modules (then maybe quantize again)
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)  # float shapes by name
    config_name: str = "config.json"  # the source's config file, for error messages
    quantizable: set[str] = field(default_factory=set)  # module paths that have to_quantized
    source_quant: dict[str, dict] = field(default_factory=dict)  # an MLX source's settings by module

    @property
    def total_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.expected.values())


def make_context(source: Source, plan: QuantPlan | None, dtype: mx.Dtype | None, requantize: bool) -> Context:
    """Read the expected names and shapes off a model built from the config (its random
    initial weights are lazy and never evaluated, so this costs no memory)."""
    ctx = Context(source, plan, dtype, requantize)
    skeleton = Mixtral(source.args)
    ctx.expected = {name: tuple(v.shape) for name, v in tree_flatten(skeleton.parameters())}
    ctx.config_name = config_path(source.path).name
    ctx.quantizable = {path for path, m in skeleton.named_modules() if hasattr(m, "to_quantized")}
    if source.quantized:
        # The loader's own rule reads each module's bits and group size off the tensor shapes.
        lazy = _sanitize(source.load(list(source.tensors)), source)
        try:
            quantize_like_checkpoint(skeleton, lazy, source.args.quantization or {})
        except LoadError as e:
            raise ConvertError(f"{source.path}: {e}") from None
        ctx.source_quant = {
            path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
            for path, m in skeleton.named_modules()
            if hasattr(m, "bits")
        }
    return ctx


def _sanitize(tensors: dict[str, mx.array], source: Source) -> dict[str, mx.array]:
    try:
        return sanitize(tensors, source.args)
    except WeightsError as e:
        raise ConvertError(f"{source.path}: {e}") from None


def convert_group(raw: dict[str, mx.array], ctx: Context) -> Iterator[tuple[str, dict[str, mx.array], Decision]]:
    """Yield (module path, output tensors by name, decision) for each module of one group."""
    tensors = _sanitize(raw, ctx.source)
    # Drop our reference to the source arrays: once a module is evaluated its inputs must be
    # freeable, and this dict would otherwise keep them alive until the whole layer is done.
    del raw
    modules: dict[str, list[str]] = {}
    for name in sorted(tensors):
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for path, names in modules.items():
        # No local names for the parts or outputs: a suspended generator would keep them alive.
        yield (path, *convert_module(path, {n.rsplit(".", 1)[1]: tensors.pop(n) for n in names}, ctx))


def _cast(x: mx.array, dtype: mx.Dtype | None) -> mx.array:
    if dtype is None or x.dtype == dtype or not mx.issubdtype(x.dtype, mx.floating):
        return x
    return x.astype(dtype)


def convert_module(path: str, parts: dict[str, mx.array], ctx: Context) -> tuple[dict[str, mx.array], Decision]:
    src = ctx.source
    allowed = {"weight", "scales", "biases"} if "scales" in parts else {"weight"}
    extra = sorted(set(parts) - allowed)
    if extra or "weight" not in parts:
        problem, name = ("unexpected", f"{path}.{extra[0]}") if extra else ("missing", f"{path}.weight")
        raise ConvertError(
            f"{src.path}: {problem} tensor {name!r} (for a {src.args.model_type} model with this config)"
        )
    quantized_in = "scales" in parts
    if quantized_in:
        q = ctx.source_quant.get(path)
        if q is None:
            raise ConvertError(f"{src.path}: tensor {path + '.scales'!r} belongs to no quantizable module")
        scales = parts["scales"]
        dtype = ctx.dtype or (scales.dtype if mx.issubdtype(scales.dtype, mx.floating) else src.float_dtype)
        try:
            weight = mx.dequantize(
                parts["weight"],
                scales,
                parts.get("biases"),
                group_size=q["group_size"],
                bits=q["bits"],
                mode=q["mode"],
                dtype=dtype,
            )
        except ValueError as e:
            raise ConvertError(f"{src.path}: cannot dequantize {path!r} ({e})") from None
    else:
        weight = parts["weight"]

    name = f"{path}.weight"
    problem = tensor_mismatch(name, tuple(weight.shape), ctx.expected, src.args.model_type, ctx.config_name)
    if problem:
        raise ConvertError(f"{src.path}: {problem}")

    if quantized_in and not ctx.requantize:
        # Reshard only: keep the packed tensors bit for bit.
        return {f"{path}.{kind}": _cast(v, ctx.dtype) for kind, v in parts.items()}, ctx.source_quant[path]

    weight = _cast(weight, ctx.dtype)
    if path not in ctx.quantizable:
        return {name: weight}, None
    decision = ctx.plan.for_module(path, weight.shape[-1]) if ctx.plan else False
    if not decision:
        return {name: weight}, False
    packed, scales, *biases = mx.quantize(weight, decision["group_size"], decision["bits"], mode=decision["mode"])
    out = {name: packed, f"{path}.scales": scales}
    if biases:
        out[f"{path}.biases"] = biases[0]
    return out, decision


def plan_outputs(ctx: Context) -> tuple[list[Entry], dict[str, dict | bool]]:
    """Every output tensor's name, dtype and shape, in writing order, and each quantizable
    module's decision; built from lazy arrays, so no weight is read."""
    entries, decisions, seen = [], {}, set()
    for _, names in ctx.source.groups():
        for path, out, decision in convert_group(ctx.source.load(names), ctx):
            entries += [Entry(n, a.dtype, tuple(a.shape), a.nbytes) for n, a in out.items()]
            seen.add(f"{path}.weight")
            if decision is not None:
                decisions[path] = decision
    missing = sorted(set(ctx.expected) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{ctx.source.path}: checkpoint lacks tensor {missing[0]!r}{more}")
    return entries, decisions
