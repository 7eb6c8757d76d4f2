"""Which precision each module gets: uniform settings, the allowed (mode, bits, group) triples,
and the named mixed-precision recipes.

A decision for one module is a dict `{"group_size", "bits", "mode"}` (quantize it like that) or
False (keep it in floating point). The same dicts go into config.json, where mlx-lm's loader and
ours read them back per module path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlx_mixtral.errors import ConvertError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
# The microscaling formats fix bits and group size (one shared 8-bit scale per group), as
# mx.quantize enforces: MXFP4/MXFP8 (OCP Microscaling spec) use 32-element blocks, NVFP4 16.
FIXED_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
MODES = ("affine", *FIXED_MODES)
DEFAULT_BITS = 4
DEFAULT_GROUP = 64

# The router is tiny (D x E) and decides which experts run; quantizing it changes routing.
_ROUTER = re.compile(r"\.block_sparse_moe\.gate$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Recipe:
    """Low bits everywhere; high bits for the embeddings, lm_head, and v_proj and down_proj of
    the sensitive layers (see `sensitive_layer`)."""

    name: str
    low: int
    high: int
    # Also raise every attention projection (q, k, v, o) in every layer: attention is ~3% of a
    # Mixtral's weights, so this costs little size.
    all_attention: bool = False


RECIPES = {
    r.name: r
    for r in [
        Recipe("mixed_2_6", 2, 6),
        Recipe("mixed_3_4", 3, 4),
        Recipe("mixed_3_6", 3, 6),
        Recipe("mixed_4_6", 4, 6),
        Recipe("mixed_3_6_attn", 3, 6, all_attention=True),
    ]
}


def sensitive_layer(index: int, num_layers: int) -> bool:
    """The first and last eighth of the layers (at least one each) plus every third layer in
    between: the split llama.cpp's Q4_K_M uses for its extra-bits tensors."""
    edge = max(1, num_layers // 8)
    return index < edge or index >= num_layers - edge or (index - edge) % 3 == 2


@dataclass(frozen=True)
class QuantPlan:
    """Decides each module's quantization from its path and input width."""

    bits: int
    group_size: int
    mode: str
    num_layers: int
    recipe: Recipe | None = None

    @property
    def default(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def for_module(self, path: str, in_dims: int) -> dict | bool:
        if _ROUTER.search(path) or in_dims % self.group_size:
            # Rows that do not split into whole groups cannot be quantized (mlx-lm skips them too).
            return False
        if self.recipe is None:
            return self.default
        return {**self.default, "bits": self._recipe_bits(path)}

    def _recipe_bits(self, path: str) -> int:
        r = self.recipe
        if path in ("model.embed_tokens", "lm_head"):
            return r.high
        m = _LAYER.match(path)
        if m is None:
            return r.low
        if r.all_attention and ".self_attn." in path:
            return r.high
        if path.endswith(("self_attn.v_proj", "down_proj")) and sensitive_layer(int(m[1]), self.num_layers):
            return r.high
        return r.low


def make_plan(bits: int | None, group_size: int | None, mode: str, recipe: str | None, num_layers: int) -> QuantPlan:
    """Check a requested setting and turn it into a plan; ConvertError names the bad value.

    None means the default. For the fixed-format modes DEFAULT_BITS/DEFAULT_GROUP (what convert()
    passes when the user chose nothing) also mean "the mode's own" rather than a conflicting request.
    """
    if mode not in MODES:
        raise ConvertError(f"unsupported quantization mode {mode!r} (expected one of: {', '.join(MODES)})")
    if mode in FIXED_MODES:
        fixed_bits, fixed_group = FIXED_MODES[mode]
        if recipe is not None:
            raise ConvertError(f"recipe {recipe!r} mixes bit widths, which only mode 'affine' allows")
        if bits not in (None, DEFAULT_BITS, fixed_bits) or group_size not in (None, DEFAULT_GROUP, fixed_group):
            raise ConvertError(
                f"mode {mode!r} uses {fixed_bits} bits with group size {fixed_group}; "
                f"got bits={bits}, group size={group_size}"
            )
        return QuantPlan(fixed_bits, fixed_group, mode, num_layers)
    group_size = DEFAULT_GROUP if group_size is None else group_size
    if group_size not in AFFINE_GROUPS:
        raise ConvertError(
            f"unsupported group size {group_size} for mode 'affine' "
            f"(expected one of: {', '.join(map(str, AFFINE_GROUPS))})"
        )
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConvertError(f"unknown recipe {recipe!r} (expected one of: {', '.join(RECIPES)})")
        r = RECIPES[recipe]
        return QuantPlan(r.low, group_size, mode, num_layers, r)
    bits = DEFAULT_BITS if bits is None else bits
    if bits not in AFFINE_BITS:
        raise ConvertError(
            f"unsupported bits {bits} for mode 'affine' (expected one of: {', '.join(map(str, AFFINE_BITS))})"
        )
    return QuantPlan(bits, group_size, mode, num_layers)


def config_entry(default: dict, decisions: dict[str, dict | bool]) -> dict:
    """config.json's "quantization": the default plus every module that differs from it.

    Modules left in floating point are listed as False and modules with other settings by
    their dict, so a loader that only applies the default to modules it finds quantized
    (older mlx-lm) and one that infers settings from shapes (ours, newer mlx-lm) agree.
    """
    entry = dict(default)
    for path in sorted(decisions):
        decision = decisions[path]
        if decision is False or decision != default:
            entry[path] = decision
    return entry
