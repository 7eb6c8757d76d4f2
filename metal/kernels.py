"""Fused Metal kernels for the k selected experts of decode-sized batches.

Two dispatches per MoE layer replace the built-in gather_qmm x3 + activation + weighting + sum:
  gate_up_swiglu     h = silu(x Wg[e]^T) * (x Wu[e]^T) for every (token, slot) pair
  down_weighted_sum  y = sum_k w_k * h_k Wd[e_k]^T   (router weights folded in, no atomics)
Expert ids and router weights stay on the GPU. The kernel bodies live in *.metal next to this file,
their shared helpers in quant_dot.h; reference.py holds the pure-MLX twins.

Shapes: B batch, L length, T = B*L tokens, D hidden, F expert hidden, E experts, K experts per token,
P = T*K (token, slot) pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import mlx.core as mx

from mlx_mixtral.dtypes import dtype_name

SIMD_WIDTH = 32  # lanes per simdgroup on Apple GPUs
SIMDGROUPS = 2  # simdgroups per threadgroup
ROWS_PER_SIMDGROUP = 4  # output rows each simdgroup owns (8 per threadgroup, as MLX's qmv)
ROW_VARIANTS = (1, 2, 4)  # the rows-per-simdgroup choices the load-time probe builds and times
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_DTYPES = (mx.float16, mx.bfloat16, mx.float32)

GATE_UP = "gate_up_swiglu"
DOWN = "down_weighted_sum"
_INPUTS = {
    GATE_UP: ["x", "indices", "gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b"],
    DOWN: ["h", "indices", "weights", "down_w", "down_s", "down_b"],
}
_OUTPUTS = {GATE_UP: ["h"], DOWN: ["out"]}


def kernel_text(kind: str) -> tuple[str, str]:
    """(body, header) of a kernel as shipped in the package."""
    if kind not in _INPUTS:
        raise ValueError(f"unknown kernel {kind!r}; expected one of {sorted(_INPUTS)}")
    here = resources.files(__package__)
    return here.joinpath(f"{kind}.metal").read_text(), here.joinpath("quant_dot.h").read_text()


def make_kernel(kind: str, body: str | None = None):
    """A metal_kernel object for `kind`; `body` replaces the shipped body (the harness uses it)."""
    shipped, header = kernel_text(kind)
    return mx.fast.metal_kernel(
        name=f"mixtral_{kind}",
        input_names=_INPUTS[kind],
        output_names=_OUTPUTS[kind],
        source=shipped if body is None else body,
        header=header,
    )


@dataclass(frozen=True)
class ExpertGeometry:
    """Everything the kernels are specialised on (their template parameters)."""

    dtype: mx.Dtype  # activation dtype (x, h, output)
    group_size: int  # of gate and up (one kernel reads both, so they must agree)
    bits: int
    hidden: int  # D
    ffn: int  # F
    experts: int  # E
    top_k: int  # K
    rows_per_simdgroup: int = ROWS_PER_SIMDGROUP
    down_group_size: int | None = None  # down may differ (mixed-precision recipes); None: as gate/up
    down_bits: int | None = None

    def quantization(self, kind: str) -> tuple[int, int]:
        """(group size, bits) of the weights kernel `kind` reads."""
        if kind == DOWN:
            return self.down_group_size or self.group_size, self.down_bits or self.bits
        return self.group_size, self.bits

    @property
    def label(self) -> str:
        """'float16/g64/4bit/down:g64/4bit/D4096/F14336/E8/K2': the instantiation, rows per simdgroup
        aside (what the probe chooses for a geometry, and what its results are kept under)."""
        (group_size, bits), (down_group, down_bits) = self.quantization(GATE_UP), self.quantization(DOWN)
        return (
            f"{dtype_name(self.dtype)}/g{group_size}/{bits}bit/down:g{down_group}/{down_bits}bit"
            f"/D{self.hidden}/F{self.ffn}/E{self.experts}/K{self.top_k}"
        )

    def template(self, kind: str) -> list[tuple[str, object]]:
        # Both kernels name the hidden size D and the expert size F; the input size comes first.
        sizes = [("D", self.hidden), ("F", self.ffn)] if kind == GATE_UP else [("F", self.ffn), ("D", self.hidden)]
        group_size, bits = self.quantization(kind)
        return [
            ("T", self.dtype),
            ("GS", group_size),
            ("BITS", bits),
            *sizes,
            ("E", self.experts),
            ("TOPK", self.top_k),
            ("R", self.rows_per_simdgroup),
        ]

    def rows(self, kind: str) -> int:
        return self.ffn if kind == GATE_UP else self.hidden

    def grid(self, kind: str, tokens: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(grid in threads, threadgroup) for dispatchThreads; z is the pair (gate_up) or token (down)."""
        per_group = SIMDGROUPS * self.rows_per_simdgroup
        groups = -(-self.rows(kind) // per_group)
        depth = tokens * self.top_k if kind == GATE_UP else tokens
        return (SIMD_WIDTH, SIMDGROUPS * groups, depth), (SIMD_WIDTH, SIMDGROUPS, 1)


_KERNELS: dict[tuple, object] = {}


def _cached_kernel(kind: str, geometry: ExpertGeometry):
    """Kernel objects are made once per template instantiation and reused by every call."""
    key = (kind, geometry)
    if key not in _KERNELS:
        _KERNELS[key] = make_kernel(kind)
    return _KERNELS[key]


def launch_gate_up(
    x: mx.array,
    indices: mx.array,
    gate: tuple,
    up: tuple,
    geometry: ExpertGeometry,
    *,
    kernel=None,
    verbose: bool = False,
) -> mx.array:
    """x (T, D), indices (P,), gate/up = (weight, scales, biases) -> h (P, F) in geometry.dtype."""
    kernel = kernel or _cached_kernel(GATE_UP, geometry)
    grid, group = geometry.grid(GATE_UP, x.shape[0])
    return kernel(
        inputs=[x, indices, *gate, *up],
        template=geometry.template(GATE_UP),
        grid=grid,
        threadgroup=group,
        output_shapes=[(indices.size, geometry.ffn)],
        output_dtypes=[geometry.dtype],
        verbose=verbose,
    )[0]


def launch_down(
    h: mx.array,
    indices: mx.array,
    weights: mx.array,
    down: tuple,
    geometry: ExpertGeometry,
    *,
    kernel=None,
    verbose: bool = False,
) -> mx.array:
    """h (P, F), indices (P,), weights (P,), down = (weight, scales, biases) -> y (T, D)."""
    kernel = kernel or _cached_kernel(DOWN, geometry)
    tokens = indices.size // geometry.top_k
    grid, group = geometry.grid(DOWN, tokens)
    return kernel(
        inputs=[h, indices, weights, *down],
        template=geometry.template(DOWN),
        grid=grid,
        threadgroup=group,
        output_shapes=[(tokens, geometry.hidden)],
        output_dtypes=[geometry.dtype],
        verbose=verbose,
    )[0]


@dataclass(frozen=True)
class Launcher:
    """How the two kernels of a fused layer are run: `gate_up(x, ids, gate, up, geometry)` and
    `down(h, ids, weights, down, geometry)`. METAL runs the Metal kernels; reference.TWINS the pure-MLX
    twins; the load-time probe takes any launcher, so tests can hand it faulty ones."""

    gate_up: Callable[..., mx.array]
    down: Callable[..., mx.array]


METAL = Launcher(launch_gate_up, launch_down)


def _quantized_parts(layer) -> tuple | None:
    """(weight, scales, biases) of an affine-quantized SwitchLinear in the kernels' layout, else None."""
    if getattr(layer, "mode", None) != "affine" or "scales" not in layer or "biases" not in layer:
        return None
    if layer.bits not in SUPPORTED_BITS or layer.group_size not in SUPPORTED_GROUP_SIZES:
        return None
    weight, scales, biases = layer.weight, layer.scales, layer.biases
    if weight.dtype != mx.uint32 or weight.ndim != 3 or scales.shape != biases.shape:
        return None
    if weight.shape[2] * 32 // layer.bits != scales.shape[2] * layer.group_size:
        return None
    return weight, scales, biases


def plan_layer(
    gate_proj, up_proj, down_proj, dtype: mx.Dtype, top_k: int, rows_per_simdgroup: int = ROWS_PER_SIMDGROUP
) -> ExpertGeometry | None:
    """The kernels' geometry for a layer's experts at activation dtype `dtype`, or None when they
    do not handle it (unquantized, not affine, bits or group size they are not built for, ...)."""
    parts = [_quantized_parts(layer) for layer in (gate_proj, up_proj, down_proj)]
    if any(p is None for p in parts) or dtype not in SUPPORTED_DTYPES:
        return None
    (gw, gs, _), (uw, us, _), (dw, ds, _) = parts
    bits, group_size = gate_proj.bits, gate_proj.group_size
    if (up_proj.bits, up_proj.group_size) != (bits, group_size):
        return None
    experts, ffn, hidden = gs.shape[0], gs.shape[1], gs.shape[2] * group_size
    if gw.shape != uw.shape or gs.shape != us.shape:
        return None
    down_group = down_proj.group_size
    if ds.shape != (experts, hidden, ffn // down_group) or ffn % down_group or dw.shape[0] != experts:
        return None
    return ExpertGeometry(
        dtype,
        group_size,
        bits,
        hidden,
        ffn,
        experts,
        top_k,
        rows_per_simdgroup,
        down_group_size=down_group,
        down_bits=down_proj.bits,
    )


def plan(
    x: mx.array, indices: mx.array, gate_proj, up_proj, down_proj, rows_per_simdgroup: int = ROWS_PER_SIMDGROUP
) -> ExpertGeometry | None:
    """The kernels' geometry for this call, or None when they do not handle it (caller falls back)."""
    if not mx.issubdtype(indices.dtype, mx.integer) or indices.ndim != x.ndim or indices.shape[:-1] != x.shape[:-1]:
        return None
    geometry = plan_layer(gate_proj, up_proj, down_proj, x.dtype, indices.shape[-1], rows_per_simdgroup)
    if geometry is None or x.shape[-1] != geometry.hidden:
        return None
    return geometry


def run_fused(
    x: mx.array, indices: mx.array, weights: mx.array, parts: dict, geometry: ExpertGeometry, launcher: Launcher
) -> mx.array:
    """x (B, L, D), indices (B, L, K), weights (B, L, K) -> (B, L, D) through `launcher`'s two kernels;
    `parts` maps "gate", "up", "down" to (weight, scales, biases)."""
    flat_x = x.reshape(-1, geometry.hidden)  # (T, D)
    flat_ids = indices.reshape(-1)  # (P,)
    h = launcher.gate_up(flat_x, flat_ids, parts["gate"], parts["up"], geometry)  # (P, F)
    y = launcher.down(h, flat_ids, weights.reshape(-1), parts["down"], geometry)  # (T, D)
    return y.reshape(x.shape)  # (B, L, D)


def layer_parts(gate_proj, up_proj, down_proj) -> dict:
    """{"gate", "up", "down"} -> (weight, scales, biases) of a layer's quantized experts."""
    return {
        name: (m.weight, m.scales, m.biases) for name, m in (("gate", gate_proj), ("up", up_proj), ("down", down_proj))
    }


def fused_switch_glu(
    x: mx.array,
    indices: mx.array,
    weights: mx.array,
    gate_proj,
    up_proj,
    down_proj,
    approved: ExpertGeometry | None = None,
):
    """x (B, L, D), indices (B, L, K), weights (B, L, K) -> (B, L, D) in x.dtype, or None if unhandled.

    Equals sum_k weights[..., k] * down_k(silu(gate_k x) * up_k x) with float32 accumulation; the
    intermediate h is rounded to x.dtype, as in the built-in path. `approved` is the instantiation
    the load-time probe built and checked for this layer: any other (a different dtype, say) is
    refused (None), so nothing unprobed compiles mid-generation.
    """
    rows = ROWS_PER_SIMDGROUP if approved is None else approved.rows_per_simdgroup
    geometry = plan(x, indices, gate_proj, up_proj, down_proj, rows)
    if geometry is None or (approved is not None and geometry != approved):
        return None
    return run_fused(x, indices, weights, layer_parts(gate_proj, up_proj, down_proj), geometry, METAL)
