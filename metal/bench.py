"""One MoE expert layer at a decode step, fused Metal kernels vs MLX's built-in ops, without a model.

`synthetic_switch_glu()` builds a SwitchGLU at Mixtral-8x7B's expert shapes with random quantized
weights (random packed words, scales and biases: no float tensor of the full size is ever made);
`compare_fused_builtin()` runs the load-time probe (probe.py) on it: every variant built, checked
against the built-in path and timed. `mlx-mixtral doctor` uses it when no model is given.
Shapes: D hidden, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_mixtral.experts import QuantizedSwitchLinear, SwitchGLU
from mlx_mixtral.metal.probe import Tuner, probe_layer


def require_metal() -> None:
    if not mx.metal.is_available():
        raise RuntimeError(
            "the fused expert kernels need a Metal GPU (Apple silicon, macOS); "
            "mx.metal.is_available() is False on this machine"
        )


def _random_words(shape: tuple[int, ...], key: mx.array) -> mx.array:
    """Uniform random uint32 words (randint draws through float32, so 16 bits at a time)."""
    hi, lo = (mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=k) for k in mx.random.split(key))
    return (hi << 16) | lo


def synthetic_experts(
    n_in: int, n_out: int, experts: int, group_size: int, bits: int, dtype: mx.Dtype, key: mx.array
) -> QuantizedSwitchLinear:
    """E experts (E, n_out, n_in) of random affine-quantized weights with zero mean and standard
    deviation about n_in^-0.5, as an initialised layer has: q uniform over 2^bits levels, so
    w = scale * q + bias with bias = -scale * (2^bits - 1) / 2 and scale = 2 sqrt(3 / n_in) / (2^bits - 1)."""
    layer = QuantizedSwitchLinear(n_in, n_out, experts, group_size, bits)  # its zeros are never evaluated
    k_words, k_scales = mx.random.split(key)
    levels = (1 << bits) - 1
    jitter = 1 + 0.1 * mx.random.normal((experts, n_out, n_in // group_size), key=k_scales)
    layer.weight = _random_words((experts, n_out, n_in * bits // 32), k_words)
    layer.scales = (2 * (3 / n_in) ** 0.5 / levels * jitter).astype(dtype)
    layer.biases = (-layer.scales.astype(mx.float32) * levels / 2).astype(dtype)
    return layer


def synthetic_switch_glu(
    *,
    hidden: int = 4096,
    ffn: int = 14336,
    experts: int = 8,
    bits: int = 4,
    group_size: int = 64,
    dtype: mx.Dtype = mx.float16,
    seed: int = 0,
) -> SwitchGLU:
    """A SwitchGLU of random quantized experts; the defaults are Mixtral-8x7B's 4-bit experts."""
    mlp = SwitchGLU(hidden, ffn, experts)
    k_gate, k_up, k_down = mx.random.split(mx.random.key(seed), 3)
    mlp.gate_proj = synthetic_experts(hidden, ffn, experts, group_size, bits, dtype, k_gate)
    mlp.up_proj = synthetic_experts(hidden, ffn, experts, group_size, bits, dtype, k_up)
    mlp.down_proj = synthetic_experts(ffn, hidden, experts, group_size, bits, dtype, k_down)
    mx.eval(mlp.parameters())
    return mlp


def compare_fused_builtin(
    *,
    hidden: int = 4096,
    ffn: int = 14336,
    experts: int = 8,
    top_k: int = 2,
    bits: int = 4,
    group_size: int = 64,
    dtype: mx.Dtype = mx.float16,
    seed: int = 0,
    tuner: Tuner | None = None,
) -> dict:
    """The probe's summary (ProbeResult.summary) for a synthetic layer of these shapes: microseconds
    per MoE layer of the best fused variant and of the built-in ops, its max error, every variant.
    Raises RuntimeError off Metal unless a `tuner` says how to run (tests pass the twins)."""
    if tuner is None:
        require_metal()
        tuner = Tuner(cache=None)
    with mx.stream(tuner.device):
        mlp = synthetic_switch_glu(
            hidden=hidden, ffn=ffn, experts=experts, bits=bits, group_size=group_size, dtype=dtype, seed=seed
        )
    result = probe_layer(mlp, dtype, top_k, tuner)
    if result is None:
        raise ValueError(f"the fused kernels do not handle {bits}-bit experts of group size {group_size}, k {top_k}")
    return result.summary()
