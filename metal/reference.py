"""Pure-MLX twins of the fused kernels: same signatures, same rounding points, any device.

They document what each kernel computes and are what the tests hold the kernels (and, on a Mac,
the GPU) against. Shapes as in kernels.py: T tokens, P = T*K pairs, D hidden, F expert hidden.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_mixtral.metal.kernels import DOWN, GATE_UP, ExpertGeometry, Launcher, layer_parts, plan, run_fused


def _dequantized(parts: tuple, ids: mx.array, geometry: ExpertGeometry, kind: str) -> mx.array:
    """The selected experts' weights in float32: (P, out, in)."""
    weight, scales, biases = (p[ids] for p in parts)
    group_size, bits = geometry.quantization(kind)
    return mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits)


def gate_up_reference(x: mx.array, indices: mx.array, gate: tuple, up: tuple, geometry: ExpertGeometry) -> mx.array:
    """Twin of kernels.launch_gate_up: x (T, D), indices (P,) -> h (P, F) in geometry.dtype."""
    pair_x = x.astype(mx.float32)[mx.arange(indices.size) // geometry.top_k]  # (P, D)
    g = (_dequantized(gate, indices, geometry, GATE_UP) @ pair_x[..., None]).squeeze(-1)  # (P, F)
    u = (_dequantized(up, indices, geometry, GATE_UP) @ pair_x[..., None]).squeeze(-1)  # (P, F)
    return (g * mx.sigmoid(g) * u).astype(geometry.dtype)


def down_reference(
    h: mx.array, indices: mx.array, weights: mx.array, down: tuple, geometry: ExpertGeometry
) -> mx.array:
    """Twin of kernels.launch_down: h (P, F), indices (P,), weights (P,) -> y (T, D)."""
    per_pair = (_dequantized(down, indices, geometry, DOWN) @ h.astype(mx.float32)[..., None]).squeeze(-1)  # (P, D)
    mixed = per_pair * weights.astype(mx.float32)[:, None]  # (P, D)
    return mixed.reshape(-1, geometry.top_k, geometry.hidden).sum(axis=1).astype(geometry.dtype)  # (T, D)


TWINS = Launcher(gate_up_reference, down_reference)


def fused_switch_glu_reference(x: mx.array, indices: mx.array, weights: mx.array, gate_proj, up_proj, down_proj):
    """Twin of kernels.fused_switch_glu (None where the kernels would refuse the layer)."""
    geometry = plan(x, indices, gate_proj, up_proj, down_proj)
    if geometry is None:
        return None
    return run_fused(x, indices, weights, layer_parts(gate_proj, up_proj, down_proj), geometry, TWINS)  # (B, L, D)
