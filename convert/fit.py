"""`--fit SIZE`: the best quantization whose output fits in SIZE bytes.

"Best" is the order of KL(float || quantized) measured by `benchmarks/convert_bench.py --recipes`
(benchmarks/README.md: a random Mixtral with Mixtral-8x7B's proportions). On those weights the
recipes that raise the attention projections beat uniform settings of the same size; real weights
may rank them differently. Each candidate's size is exact: it comes from the converter's own
planning pass over lazy arrays (every output tensor's shape and dtype, nothing read).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_mixtral.convert.quant import make_plan
from mlx_mixtral.convert.source import Source
from mlx_mixtral.convert.transform import make_context, plan_outputs
from mlx_mixtral.errors import ConvertError
from mlx_mixtral.memory.budget import gb

# Lowest KL first (measured KL in nats on the benchmark model, for the record).
QUALITY_ORDER = [
    ("uniform 8-bit", {"q_bits": 8}),  # 0.0075
    ("uniform 6-bit", {"q_bits": 6}),  # 0.038
    ("mixed_3_6_attn", {"recipe": "mixed_3_6_attn"}),  # 0.121
    ("mixed_4_6", {"recipe": "mixed_4_6"}),  # 0.257
    ("uniform 4-bit", {"q_bits": 4}),  # 0.358
    ("mixed_3_6", {"recipe": "mixed_3_6"}),  # 0.752
    ("mixed_3_4", {"recipe": "mixed_3_4"}),  # 0.786
    ("uniform 3-bit", {"q_bits": 3}),  # 1.16
    ("mixed_2_6", {"recipe": "mixed_2_6"}),  # 3.03
    ("uniform 2-bit", {"q_bits": 2}),  # 4.16
]


@dataclass(frozen=True)
class FitChoice:
    label: str
    settings: dict  # convert() keywords: q_bits or recipe
    size: int  # bytes of the output's weights
    budget: int

    def line(self) -> str:
        return f"--fit {gb(self.budget)}: {self.label}, {gb(self.size)} of weights"


def output_size(source: Source, settings: dict, group_size: int | None, dtype: mx.Dtype | None) -> int:
    """Bytes of every tensor the converter would write for these settings."""
    plan = make_plan(settings.get("q_bits"), group_size, "affine", settings.get("recipe"),
                     source.args.num_hidden_layers)  # fmt: skip
    entries, _ = plan_outputs(make_context(source, plan, dtype, requantize=True))
    return sum(e.nbytes for e in entries)


def choose_fit(
    source: Source, budget: int, *, group_size: int | None = None, dtype: mx.Dtype | None = None
) -> FitChoice:
    """The first setting of QUALITY_ORDER whose output fits in `budget` bytes."""
    size = 0
    for label, settings in QUALITY_ORDER:
        size = output_size(source, settings, group_size, dtype)
        if size <= budget:
            return FitChoice(label, settings, size, budget)
    raise ConvertError(f"{source.path}: nothing fits in {gb(budget)}: the smallest setting "
                       f"({QUALITY_ORDER[-1][0]}) needs {gb(size)}")  # fmt: skip
