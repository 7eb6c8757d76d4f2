"""Fused Metal kernels for Mixtral's decode-time expert matmuls (see README.md in this folder).

`fused_switch_glu` is what mlx_mixtral.experts.SwitchGLU calls on a Metal GPU for small batches;
it returns None for layers the kernels do not handle, and the caller falls back to built-in ops.
"""

from mlx_mixtral.metal.kernels import ExpertGeometry, fused_switch_glu, launch_down, launch_gate_up, plan
from mlx_mixtral.metal.reference import down_reference, fused_switch_glu_reference, gate_up_reference

__all__ = [
    "ExpertGeometry",
    "down_reference",
    "fused_switch_glu",
    "fused_switch_glu_reference",
    "gate_up_reference",
    "launch_down",
    "launch_gate_up",
    "plan",
]
