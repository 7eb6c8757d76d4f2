"""The dtype tables, once: the float dtypes users name, and safetensors' dtype codes.

safetensors names each tensor's element type with a short code ("BF16", "U32", ...;
https://github.com/huggingface/safetensors); here each code has its width, its MLX dtype and a
numpy dtype of the same width (bfloat16 travels through numpy as its raw 16 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_mixtral.errors import OptionError

# The floating-point dtypes a user may ask for (--dtype, the kernels' activation dtypes).
FLOAT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def dtype_name(dtype: mx.Dtype) -> str:
    """'bfloat16' for mx.bfloat16 (one of FLOAT_DTYPES)."""
    return next(name for name, d in FLOAT_DTYPES.items() if d == dtype)


def parse_dtype(value: str | mx.Dtype | None, what: str = "dtype") -> mx.Dtype | None:
    """A float dtype from its name (or as given); None stays None. OptionError names `what`."""
    if value is None or value in FLOAT_DTYPES.values():
        return value
    if isinstance(value, str) and value in FLOAT_DTYPES:
        return FLOAT_DTYPES[value]
    raise OptionError(f"unsupported {what} {value!r} (expected one of: {', '.join(FLOAT_DTYPES)})", option=what)


def compute_dtype(float_weight_dtypes: list[mx.Dtype]) -> mx.Dtype:
    """The dtype a model computes in when none is asked for, given the dtypes of its floating-point
    weight tensors: float32 on the CPU backend (measured with mlx 0.32: its quantized matmul is ~8x
    faster with float32 scales than bfloat16, and gather_mm accepts only float32); elsewhere the
    checkpoint's most common float dtype (usually bfloat16 or float16, the fast types on Apple GPUs)."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return max(set(float_weight_dtypes), key=float_weight_dtypes.count) if float_weight_dtypes else mx.float16


@dataclass(frozen=True)
class StorageType:
    """One safetensors dtype code."""

    code: str
    nbytes: int
    mlx: mx.Dtype | None  # None: MLX has no such dtype (float8, float64 on the GPU, ...)
    numpy: type | None  # numpy dtype of the same width, for reading raw bytes (None: not readable here)

    @property
    def is_float(self) -> bool:
        return self.code in ("F16", "BF16", "F32")


SAFETENSORS = {
    t.code: t
    for t in [
        StorageType("BOOL", 1, mx.bool_, np.bool_),
        StorageType("U8", 1, mx.uint8, np.uint8),
        StorageType("I8", 1, mx.int8, np.int8),
        StorageType("F8_E4M3", 1, None, None),
        StorageType("F8_E5M2", 1, None, None),
        StorageType("U16", 2, mx.uint16, np.uint16),
        StorageType("I16", 2, mx.int16, np.int16),
        StorageType("F16", 2, mx.float16, np.float16),
        StorageType("BF16", 2, mx.bfloat16, np.uint16),
        StorageType("U32", 4, mx.uint32, np.uint32),
        StorageType("I32", 4, mx.int32, np.int32),
        StorageType("F32", 4, mx.float32, np.float32),
        StorageType("U64", 8, mx.uint64, np.uint64),
        StorageType("I64", 8, mx.int64, np.int64),
        StorageType("F64", 8, None, np.float64),
    ]
}
# MLX dtype -> its safetensors code, for writing.
SAFETENSORS_CODE = {t.mlx: t.code for t in SAFETENSORS.values() if t.mlx is not None}
