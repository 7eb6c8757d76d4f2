"""Tensor parallelism: one Mixtral (or dense Mistral) split across the ranks of an `mx.distributed` group.

Shapes: B batch, L length, D hidden, H / Hkv query / key-value heads, Dh head dim, E experts,
F expert (or MLP) hidden. `_local` means this rank's part.

Every rank holds every layer; inside a layer the matrices are split the way Megatron-LM splits a
transformer (Shoeybi et al. 2019, arXiv:1909.08053):
- attention: each rank owns a contiguous run of KV heads and the query heads that read them.
  q/k/v keep only those heads' output rows ("column shards"); o_proj keeps only their input
  columns ("row shard"), so each rank's output is a partial sum and one `all_sum` of (B, L, D)
  completes it.
- experts and the dense MLP: every expert lives on every rank, each rank holding a contiguous
  slice f0:f1 of its F dim: gate/up keep rows f0:f1, down keeps columns f0:f1, and one `all_sum`
  after the router-weighted sum over the K experts completes the layer.
- embeddings, norms, the router and lm_head are replicated (~1.5% of Mixtral-8x7B), so every rank
  computes the same routing and the same logits without further communication.

Why slices of F rather than whole experts per rank ("expert parallelism"): a decode token reads
the K chosen experts. With F slices each rank reads exactly 1/N of them. With E/N whole experts per
rank the step waits for the rank that holds most of the chosen ones: for 8 experts, top-2 and
2 ranks both land on one rank with probability 3/7, so the slowest rank reads 10/7 = 1.43 experts'
bytes instead of 1 (and 8 experts do not spread evenly over 3 ranks). Both need one all_sum per
MoE layer, so F slices read fewer bytes per token for the same number of collectives.

Quantized layers (mx.quantize) pack each row in groups along the input dim, so row shards cut the
input only at whole groups; output rows (column shards) split anywhere. Splits need not be even:
8 KV heads on 3 ranks become 3 + 3 + 2, F = 14336 with groups of 64 becomes 75 + 75 + 74 groups.
When there are fewer KV heads than ranks, attention is replicated instead (every rank computes all
heads; no all_sum for it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx

from mlx_mixtral.cache import Cache
from mlx_mixtral.config import ModelArgs
from mlx_mixtral.errors import ShardError
from mlx_mixtral.model import MLP, Attention, Mixtral, SparseMoE

# Which parameters are split, and how, by their (sanitized) name.
_SPLITS = [
    (re.compile(r"\.self_attn\.q_proj\.(weight|scales|biases)$"), "q"),
    (re.compile(r"\.self_attn\.[kv]_proj\.(weight|scales|biases)$"), "kv"),
    (re.compile(r"\.self_attn\.o_proj\.(weight|scales|biases)$"), "o"),
    (re.compile(r"\.(switch_mlp|mlp)\.(gate_proj|up_proj)\.(weight|scales|biases)$"), "ffn_rows"),
    (re.compile(r"\.(switch_mlp|mlp)\.down_proj\.(weight|scales|biases)$"), "ffn_cols"),
]


def _split_kind(name: str) -> str | None:
    return next((kind for pattern, kind in _SPLITS if pattern.search(name)), None)


def even_split(n: int, parts: int) -> tuple[int, ...]:
    """n items in `parts` contiguous runs whose sizes differ by at most one, larger runs first."""
    base, extra = divmod(n, parts)
    return tuple(base + (i < extra) for i in range(parts))


def _bounds(sizes: tuple[int, ...], rank: int) -> tuple[int, int]:
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _input_unit(shapes: Mapping[str, tuple[int, ...]], kind: str, full_in: int) -> int:
    """The finest step (in unquantized input elements) at which every stored tensor of `kind` can
    be cut: 1 for float weights, 32/bits for packed weights, the group size for scales/biases."""
    unit = 1
    for name, shape in shapes.items():
        if _split_kind(name) == kind:
            unit = math.lcm(unit, full_in // math.gcd(full_in, shape[-1]))
    return unit


@dataclass(frozen=True)
class ShardPlan:
    """How a model is split over `size` ranks (the same plan on every rank)."""

    size: int
    head_dim: int
    q_per_kv: int
    num_heads: int
    kv_heads: tuple[int, ...] | None  # KV heads per rank; None: attention replicated on every rank
    ffn: tuple[int, ...]  # F per rank
    note: str = ""  # why attention is replicated, for logs

    def kv_range(self, rank: int) -> tuple[int, int]:
        return _bounds(self.kv_heads, rank)

    def ffn_range(self, rank: int) -> tuple[int, int]:
        return _bounds(self.ffn, rank)

    def local_args(self, args: ModelArgs, rank: int) -> ModelArgs:
        """The hyper-parameters of this rank's part of each layer."""
        changes: dict[str, Any] = {"intermediate_size": self.ffn[rank]}
        if self.kv_heads is not None:
            kv = self.kv_heads[rank]
            changes.update(num_key_value_heads=kv, num_attention_heads=kv * self.q_per_kv)
        return replace(args, **changes)

    def element_range(self, name: str, rank: int) -> tuple[int, int, int] | None:
        """(axis, start, stop) in unquantized elements: output rows (axis -2) or input columns
        (axis -1) of parameter `name` that `rank` keeps; None when it is replicated."""
        kind = _split_kind(name)
        if kind is None or (kind in ("q", "kv", "o") and self.kv_heads is None):
            return None
        if kind in ("ffn_rows", "ffn_cols"):
            return (-2 if kind == "ffn_rows" else -1, *self.ffn_range(rank))
        kv0, kv1 = self.kv_range(rank)
        per = self.head_dim if kind == "kv" else self.head_dim * self.q_per_kv
        return (-1 if kind == "o" else -2, kv0 * per, kv1 * per)

    def slice_of(self, name: str, shape: tuple[int, ...], rank: int) -> tuple[int, int, int] | None:
        """`element_range` in the stored tensor's own columns (packed words, groups of scales)."""
        spec = self.element_range(name, rank)
        if spec is None or spec[0] == -2:
            return spec
        _, start, stop = spec
        full_in = self.num_heads * self.head_dim if _split_kind(name) == "o" else sum(self.ffn)
        cols = shape[-1]
        if (start * cols) % full_in or (stop * cols) % full_in:
            raise ShardError(
                f"{name}: cannot cut its {full_in} inputs at {start}:{stop}, not a whole "
                f"quantization group of its stored width {cols}"
            )
        return -1, start * cols // full_in, stop * cols // full_in


def plan_shards(args: ModelArgs, size: int, shapes: Mapping[str, tuple[int, ...]]) -> ShardPlan:
    """Choose the split for `size` ranks from the model and the stored parameter shapes (which
    tell the quantization group sizes). Raises ShardError when F cannot give every rank a part."""
    if size < 1:
        raise ShardError(f"group size must be >= 1, got {size}")
    n_heads, n_kv, dh = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    q_per_kv, f = n_heads // n_kv, args.intermediate_size

    unit = _input_unit(shapes, "ffn_cols", f)
    if f // unit < size:
        what = f"{f // unit} quantization groups of {unit}" if unit > 1 else f"{f} columns"
        raise ShardError(
            f"intermediate_size={f} has only {what}; cannot give each of {size} ranks a part (use fewer ranks)"
        )
    ffn = tuple(n * unit for n in even_split(f // unit, size))

    kv_heads, note = None, ""
    if size > 1:
        attn_unit = _input_unit(shapes, "o", n_heads * dh)
        split = even_split(n_kv, size)
        cuts = [sum(split[:r]) * q_per_kv * dh for r in range(1, size)]
        if n_kv < size:
            note = f"{n_kv} KV heads for {size} ranks: attention replicated on every rank"
        elif any(c % attn_unit for c in cuts):
            note = (
                f"o_proj groups of {attn_unit} inputs do not align with head boundaries: "
                f"attention replicated on every rank"
            )
        else:
            kv_heads = split
    else:
        kv_heads = (n_kv,)
    return ShardPlan(size, dh, q_per_kv, n_heads, kv_heads, ffn, note)


def shard_summary(plan: ShardPlan, rank: int) -> str:
    """One line for logs: what this rank holds."""
    f0, f1 = plan.ffn_range(rank)
    if plan.kv_heads is None:
        attn = f"all {plan.num_heads} heads ({plan.note})"
    else:
        kv0, kv1 = plan.kv_range(rank)
        attn = f"KV heads {kv0}:{kv1} (query heads {kv0 * plan.q_per_kv}:{kv1 * plan.q_per_kv})"
    return f"rank {rank}/{plan.size}: {attn}, F {f0}:{f1} of {sum(plan.ffn)}"


class ShardedAttention(Attention):
    """Attention over this rank's heads; the partial o_proj outputs are summed over the group."""

    def __init__(self, args: ModelArgs, group: mx.distributed.Group):
        super().__init__(args)  # args holds this rank's head counts: q/k/v/o get local shapes
        self.group = group

    def __call__(self, x: mx.array, cache: Cache | None = None) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x, cache), group=self.group)  # (B, L, D)


class ShardedSparseMoE(SparseMoE):
    """The replicated router picks the same experts on every rank; each rank runs its F slice of
    them, and the weighted partial sums are added over the group (one all_sum, after the K-sum)."""

    def __init__(self, args: ModelArgs, group: mx.distributed.Group):
        super().__init__(args)  # args.intermediate_size is this rank's F slice
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)  # (B, L, D)


class ShardedMLP(MLP):
    def __init__(self, dim: int, hidden_local: int, group: mx.distributed.Group):
        super().__init__(dim, hidden_local)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)  # (B, L, D)


def shard_modules(model: Mixtral, plan: ShardPlan, rank: int, group: mx.distributed.Group) -> None:
    """Replace each layer's attention and feed-forward with this rank's (still unloaded) part.

    The replaced full-size modules are never evaluated: MLX arrays are lazy, so their random
    initial weights are dropped without ever being allocated."""
    local = plan.local_args(model.args, rank)
    for layer in model.layers:
        if plan.kv_heads is not None:
            layer.self_attn = ShardedAttention(local, group)
        if model.args.is_moe:
            layer.block_sparse_moe = ShardedSparseMoE(local, group)
        else:
            layer.mlp = ShardedMLP(local.hidden_size, local.intermediate_size, group)
