"""Count the GPU dispatches of one MoE layer for one decode token, fused kernels vs built-in ops.

Counted from the graph MLX traces (mx.export_function with a callback), so it works off a Mac.
A primitive that only re-describes memory (reshape of a contiguous array, broadcast, squeeze,
slice, ...) launches nothing; every other primitive is one kernel launch. Not counted: copies MLX
makes inside a primitive for non-contiguous inputs (none expected for a single decode token, whose
(1, 1, K) slice of top-k ids has unit stride along K).
"""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import mlx.nn as nn

from mlx_mixtral.bench.accounting import VIEW_PRIMITIVES
from mlx_mixtral.experts import SwitchGLU, route
from mlx_mixtral.metal.kernels import fused_switch_glu


def traced_primitives(fn, *arrays: mx.array) -> list[str]:
    """Names of the primitives `fn(*arrays)` records, in graph order. Traced with export_function
    rather than accounting.trace (export_to_dot of the outputs) because building the outputs of a
    custom Metal kernel needs a Metal device, while tracing it does not."""
    names: list[str] = []

    def visit(entry: dict) -> None:
        if entry.get("type") == "primitive":
            names.append(entry["name"])

    mx.export_function(visit, fn, *arrays)
    return names


def count(names: list[str]) -> dict:
    """{"dispatches": n, "views": m, "kernels": Counter of the dispatching primitives}."""
    launches = Counter(n for n in names if n not in VIEW_PRIMITIVES)
    return {"dispatches": sum(launches.values()), "views": len(names) - sum(launches.values()), "kernels": launches}


def moe_layer_counts(
    hidden: int = 128,
    ffn: int = 256,
    experts: int = 8,
    top_k: int = 2,
    bits: int = 4,
    group_size: int = 64,
    dtype: mx.Dtype = mx.float16,
) -> dict[str, dict]:
    """Dispatch counts for one token (B = L = 1) through a quantized Mixtral MoE layer.

    Keys: "builtin" and "fused" (the expert part, SwitchGLU), "router" (the part both share:
    router matmul, top-k, softmax). The counts do not depend on the sizes.
    """
    mlp = SwitchGLU(hidden, ffn, experts)
    mlp.set_dtype(dtype)  # scales in the activation dtype, as in a converted model
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, getattr(mlp, name).to_quantized(group_size, bits))
    router = nn.Linear(hidden, experts, bias=False)
    router.set_dtype(dtype)
    mx.eval(mlp.parameters(), router.parameters())
    x = mx.zeros((1, 1, hidden), dtype=dtype)  # (B, L, D)
    indices, weights = route(router(x), top_k)  # (B, L, K)
    mx.eval(indices, weights)

    def fused(x, indices, weights):
        return fused_switch_glu(x, indices, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    builtin = count(traced_primitives(mlp.builtin, x, indices, weights))  # SwitchGLU's own path, also on a Mac
    return {
        "router": count(traced_primitives(lambda x: route(router(x), top_k), x)),
        "builtin": builtin,
        "fused": count(traced_primitives(fused, x, indices, weights)),
    }
