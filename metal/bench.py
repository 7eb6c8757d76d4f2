"""Time one MoE expert layer for a decode step, fused Metal kernels vs MLX's built-in ops (Mac only).

For `mlx-mixtral bench --kernels`: `compare_fused_builtin()` builds a SwitchGLU at Mixtral-8x7B
shapes with random 4-bit weights, runs both paths on the same routed token and reports the median
time per call and how far the two outputs are apart. Shapes: T tokens, D hidden, F expert hidden,
E experts, K experts per token.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from mlx_mixtral.experts import QuantizedSwitchLinear, SwitchGLU, route
from mlx_mixtral.metal.kernels import fused_switch_glu


def _require_metal() -> None:
    if not mx.metal.is_available():
        raise RuntimeError(
            "the fused expert kernels need a Metal GPU (Apple silicon, macOS); "
            "mx.metal.is_available() is False on this machine"
        )


def _random_experts(
    n_in: int, n_out: int, experts: int, group_size: int, bits: int, dtype: mx.Dtype
) -> QuantizedSwitchLinear:
    layer = QuantizedSwitchLinear(n_in, n_out, experts, group_size, bits)
    # Replaces the constructor's (never evaluated) zeros before anything is materialised.
    layer.set_weight(mx.random.normal((experts, n_out, n_in), dtype=dtype) * (n_in**-0.5))
    mx.eval(layer.parameters())
    return layer


def _median_ms(fn, iters: int, warmup: int) -> tuple[float, mx.array]:
    out = None
    for _ in range(warmup):
        out = fn()
        mx.eval(out)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def compare_fused_builtin(
    *,
    hidden: int = 4096,
    ffn: int = 14336,
    experts: int = 8,
    top_k: int = 2,
    bits: int = 4,
    group_size: int = 64,
    dtype: mx.Dtype = mx.float16,
    tokens: int = 1,
    iters: int = 50,
    warmup: int = 5,
    seed: int = 0,
) -> dict:
    """Median ms per SwitchGLU call for `tokens` decode tokens, built-in vs fused, and max |difference|.

    Raises RuntimeError off Metal. Defaults are Mixtral-8x7B's expert shapes.
    """
    _require_metal()
    if tokens * top_k > 16:
        raise ValueError(f"tokens * top_k = {tokens * top_k}: the fused path is for decode (at most 16 pairs)")
    mx.random.seed(seed)
    mlp = SwitchGLU(hidden, ffn, experts)
    mlp.gate_proj = _random_experts(hidden, ffn, experts, group_size, bits, dtype)
    mlp.up_proj = _random_experts(hidden, ffn, experts, group_size, bits, dtype)
    mlp.down_proj = _random_experts(ffn, hidden, experts, group_size, bits, dtype)
    x = mx.random.normal((tokens, 1, hidden), dtype=dtype)  # (B, L, D)
    indices, weights = route(mx.random.normal((tokens, 1, experts)), top_k)  # (B, L, K)
    mx.eval(x, indices, weights)

    def fused():
        out = fused_switch_glu(x, indices, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if out is None:
            raise ValueError("the fused kernels do not handle this configuration")
        return out

    mlp.use_fused = False  # SwitchGLU's built-in gathered ops
    builtin_ms, builtin_out = _median_ms(lambda: mlp(x, indices, weights), iters, warmup)
    fused_ms, fused_out = _median_ms(fused, iters, warmup)
    diff = mx.abs(fused_out.astype(mx.float32) - builtin_out.astype(mx.float32))
    return {
        "shape": {
            "hidden": hidden,
            "ffn": ffn,
            "experts": experts,
            "top_k": top_k,
            "bits": bits,
            "group_size": group_size,
            "dtype": str(dtype),
            "tokens": tokens,
        },
        "builtin_ms": builtin_ms,
        "fused_ms": fused_ms,
        "speedup": builtin_ms / fused_ms,
        "max_abs_diff": diff.max().item(),
        "max_abs_builtin": mx.abs(builtin_out).max().item(),
    }
