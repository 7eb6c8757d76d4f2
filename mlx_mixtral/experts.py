"""Stacked expert layers, top-k routing, and the choice of kernel for the expert matmuls.

Shapes: B batch, L length, D hidden, E experts, K experts per token, F expert hidden,
N = B*L*K (token, slot) pairs.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn

from mlx_mixtral.errors import OptionError

# Sorting (token, slot) pairs by expert makes each expert's rows contiguous so the gathered
# matmul streams every expert's weights once; it pays off once there are many pairs (prefill).
SORT_MIN_PAIRS = 64

# Decode-sized batches go through the fused Metal kernels (metal/) when the model chose them.
FUSED_MAX_PAIRS = 16
# Which expert kernels a model uses, decided once (load(kernels=...), --kernels, or this variable):
# "fused" the Metal kernels of metal/, "builtin" MLX's gathered ops, "auto" the fused ones where
# there is a Metal GPU. "1"/"0" are accepted as "auto"/"builtin".
KERNELS_ENV = "MLX_MIXTRAL_KERNELS"
KERNEL_CHOICES = ("auto", "fused", "builtin")
_ENV_SPELLINGS = {"": "auto", "1": "auto", "on": "auto", "0": "builtin", "off": "builtin"}


def route(router_logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Top-k experts per token and their mixing weights.

    The weights are a softmax over the k chosen logits only, taken in float32; this equals
    Mixtral's reference (softmax over all E, keep top-k, renormalize) and is cheaper.
    """
    # stop_gradient before the gather: otherwise training asks take_along_axis for a VJP
    # with respect to its indices, which MLX refuses ("[gather_axis] Cannot calculate VJP").
    inds = mx.stop_gradient(mx.argpartition(-router_logits, kth=k - 1, axis=-1)[..., :k])  # (B, L, K)
    chosen = mx.take_along_axis(router_logits, inds, axis=-1).astype(mx.float32)  # (B, L, K)
    return inds.astype(mx.uint32), mx.softmax(chosen, axis=-1, precise=True)


def _uniform_init(shape: tuple[int, ...], fan_in: int) -> mx.array:
    bound = 1.0 / math.sqrt(fan_in)
    return mx.random.uniform(-bound, bound, shape)


class SwitchLinear(nn.Module):
    """E stacked linear layers without bias, weight `(E, out, in)`, applied per (token, expert)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = _uniform_init((num_experts, output_dims, input_dims), input_dims)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        weight = self.weight
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # The CPU backend's gather_mm only takes float32 (bfloat16 and float16 raise); the loader stores
            # unquantized experts in float32 on the CPU, so this upcast is only a fallback
            # for models built by hand in half precision.
            out = mx.gather_mm(
                x.astype(mx.float32),
                weight.astype(mx.float32).swapaxes(-1, -2),
                rhs_indices=indices,
                sorted_indices=sorted_indices,
            )
            return out.astype(x.dtype)
        return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> QuantizedSwitchLinear:
        num_experts, output_dims, input_dims = self.weight.shape
        layer = QuantizedSwitchLinear(input_dims, output_dims, num_experts, group_size, bits, mode)
        layer.set_weight(self.weight)
        return layer


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with each expert quantized by `mx.quantize` (packed weight, scales[, biases])."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.set_weight(mx.zeros((num_experts, output_dims, input_dims)))
        self.freeze()

    def set_weight(self, weight: mx.array) -> None:
        """Quantize a float `(E, out, in)` weight into this layer's parameters."""
        packed, scales, *biases = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        self.weight, self.scales = packed, scales
        if biases:
            self.biases = biases[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


def kernel_choice(choice: str | None = None) -> str:
    """A kernel choice checked, with None meaning the environment's (else "auto")."""
    if choice is None:
        raw = os.environ.get(KERNELS_ENV, "").strip().lower()
        choice = _ENV_SPELLINGS.get(raw, raw)
        where = f"{KERNELS_ENV}={raw!r}"
    else:
        where = f"kernels={choice!r}"
    if choice not in KERNEL_CHOICES:
        raise OptionError(f"{where}: expected one of {', '.join(KERNEL_CHOICES)}", option="kernels")
    return choice


class SwitchGLU(nn.Module):
    """The k selected SwiGLU experts of every token, mixed by the router weights."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        # The fused Metal kernel instantiation (metal.ExpertGeometry) the load-time probe built, checked
        # and chose for this layer's decode steps; None: MLX's built-in ops. Set by Mixtral.set_kernels.
        self.fused = None
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x (B, L, D), indices (B, L, K) uint32, weights (B, L, K) float32 -> (B, L, D)."""
        if self.fused is not None and indices.size <= FUSED_MAX_PAIRS and mx.default_device() == mx.gpu:
            from mlx_mixtral.metal import fused_switch_glu

            out = fused_switch_glu(x, indices, weights, self.gate_proj, self.up_proj, self.down_proj, self.fused)
            if out is not None:
                return out
        return self.builtin(x, indices, weights)

    def builtin(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """The same result with MLX's gathered matmuls (what the fused kernels are held against)."""
        if indices.size >= SORT_MIN_PAIRS:
            y = self._sorted(x, indices)  # (B, L, K, D)
        else:
            y = self.expert_outputs(x[..., None, None, :], indices, sorted_indices=False)  # (B, L, K, 1, D)
            y = y.squeeze(-2)  # (B, L, K, D)
        return (y * weights[..., None]).sum(axis=-2).astype(x.dtype)  # (B, L, D)

    def expert_outputs(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """SwiGLU of each row of x through the expert its index names: x (..., 1, D), indices (...)
        -> (..., 1, D); `sorted_indices` when equal indices are adjacent."""
        gate = self.gate_proj(x, indices, sorted_indices)
        up = self.up_proj(x, indices, sorted_indices)
        return self.down_proj(nn.silu(gate) * up, indices, sorted_indices)

    def _sorted(self, x: mx.array, indices: mx.array) -> mx.array:
        """Run the (token, slot) pairs grouped by expert, then put them back in place."""
        *lead, k = indices.shape
        flat = indices.flatten()  # (N,)
        order = mx.argsort(flat)  # (N,)
        tokens = x.reshape(-1, 1, x.shape[-1])[order // k]  # (N, 1, D) in expert order
        y = self.expert_outputs(tokens, flat[order], sorted_indices=True)  # (N, 1, D)
        y = y.squeeze(1)[mx.argsort(order)]  # (N, D) back in (token, slot) order
        return y.reshape(*lead, k, -1)  # (B, L, K, D)
