"""The expert slots of one MoE layer: which expert sits in which slot, and the slot tensors.

The slots are the parameters of an ordinary `SwitchGLU` whose stacked expert dimension is the number
of slots instead of E, so the resident code (gathered matmuls, the fused Metal kernels) runs on them
unchanged once expert ids are mapped to slot ids. A new expert is written into its slot in place
(a slice update of the slot tensor, evaluated at once so MLX reuses the buffer).
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx
import numpy as np

from mlx_mixtral.experts import SwitchGLU


class LayerCache:
    def __init__(self, layer: int, num_experts: int, slots: SwitchGLU, num_slots: int, policy):
        self.layer = layer
        self.slots = slots
        self.policy = policy
        self.slot_of = np.full(num_experts, -1, np.int32)  # expert -> slot, -1 when not cached
        self.expert_at = [-1] * num_slots  # slot -> expert, -1 when free
        self._tick = 0

    @property
    def num_slots(self) -> int:
        return len(self.expert_at)

    def cached(self, expert: int) -> bool:
        return self.slot_of[expert] >= 0

    def touch(self, experts: Iterable[int]) -> None:
        self._tick += 1
        for e in experts:
            self.policy.touch(int(e), self._tick)

    def place(self, expert: int, arrays: dict[str, np.ndarray], keep: set[int]) -> None:
        """Write `expert` (its parts as read from disk) into a free slot, else into the slot of the
        policy's victim among the cached experts not in `keep` (the ones this step still needs)."""
        if -1 in self.expert_at:
            slot = self.expert_at.index(-1)
        else:
            victim = self.policy.victim(e for e in self.expert_at if e not in keep)
            slot = int(self.slot_of[victim])
            self.slot_of[victim] = -1
            self.policy.forget(victim)
        written = []
        for name, value in arrays.items():
            proj, kind = name.split(".")
            pool = getattr(self.slots, proj)
            target = pool[kind]
            target[slot] = _as_stored(mx.array(value), value, target.dtype)
            written.append(target)
        mx.eval(written)  # now, so the slot tensors are updated in place and the host copy can go
        self.slot_of[expert] = slot
        self.expert_at[slot] = expert

    def slot_table(self) -> mx.array:
        """(E,) slot of each expert for the gathered matmuls; experts not cached map to slot 0,
        which only pairs that are not computed (or have weight 0) can name."""
        return mx.array(np.maximum(self.slot_of, 0))


def _as_stored(part: mx.array, raw: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """A part read as raw numpy into the slot's dtype: bfloat16 travels as its 16 bits, floats are
    cast to the compute dtype the slots hold."""
    if raw.dtype == np.uint16 and dtype != mx.uint16:
        part = part.view(mx.bfloat16)
    return part.astype(dtype) if part.dtype != dtype else part
