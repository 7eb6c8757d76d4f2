"""Float64 numpy answers for the fused expert kernels, and the tolerance they are held to.

Independent of MLX's matmuls: weights are unpacked here from the packed words (the tests check this
unpacking against mx.dequantize), and every product and sum is taken in float64.
Shapes: T tokens, P = T*K pairs, D hidden, F expert hidden, E experts.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# (rtol, atol as a fraction of max|reference|) per output dtype. The kernels accumulate in float32
# and round the result once to the output dtype, so the error is about half an ulp of the output
# (2^-11 for float16, 2^-8 for bfloat16) plus float32 accumulation error.
KERNEL_TOLERANCE = {"float32": (1e-5, 1e-5), "float16": (2.0**-10, 1e-4), "bfloat16": (2.0**-7, 1e-3)}
# End to end, h is rounded to the activation dtype before the down projection; that error is
# summed over F terms, so it is held against the output's scale.
PIPELINE_TOLERANCE = {"float32": (1e-5, 2e-5), "float16": (2.0**-9, 2.0**-8), "bfloat16": (2.0**-6, 2.0**-5)}


def to_f64(a: mx.array) -> np.ndarray:
    """Exact float64 copy of a float array (bfloat16 goes through float32, which holds it exactly)."""
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a).astype(np.float64)


def unpack_affine(packed: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> np.ndarray:
    """(..., out, in*bits/32) uint32 words -> (..., out, in) float64 weights, w = scale * q + bias."""
    words = np.array(packed).astype(np.uint64)
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint64) * bits  # value j of a word sits at bits*j
    q = (words[..., None] >> shifts) & np.uint64((1 << bits) - 1)  # (..., out, words, per_word)
    q = q.reshape(*words.shape[:-1], -1).astype(np.float64)  # (..., out, in)
    s = np.repeat(to_f64(scales), group_size, axis=-1)  # (..., out, in)
    b = np.repeat(to_f64(biases), group_size, axis=-1)  # (..., out, in)
    return s * q + b


def gate_up64(x: np.ndarray, ids: np.ndarray, gate: np.ndarray, up: np.ndarray, top_k: int) -> np.ndarray:
    """x (T, D), ids (P,), gate/up (E, F, D) -> silu(x Wg^T) * (x Wu^T) per pair: (P, F)."""
    pair_x = x[np.arange(ids.size) // top_k]  # (P, D)
    g = np.einsum("pd,pfd->pf", pair_x, gate[ids])  # (P, F)
    u = np.einsum("pd,pfd->pf", pair_x, up[ids])  # (P, F)
    return g / (1.0 + np.exp(-g)) * u


def down64(h: np.ndarray, ids: np.ndarray, weights: np.ndarray, down: np.ndarray, top_k: int) -> np.ndarray:
    """h (P, F), ids (P,), weights (P,), down (E, D, F) -> sum_k w_k h_k Wd^T: (T, D)."""
    per_pair = np.einsum("pf,pdf->pd", h, down[ids]) * weights[:, None]  # (P, D)
    return per_pair.reshape(-1, top_k, per_pair.shape[-1]).sum(axis=1)  # (T, D)


def compare(out: np.ndarray, ref: np.ndarray, tolerance: tuple[float, float], what: str) -> float:
    """Raise AssertionError unless |out - ref| <= rtol*|ref| + atol*max|ref| everywhere (NaN fails).

    Returns the largest error relative to max|ref|.
    """
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {out.shape} != reference {ref.shape}")
    missing = np.isnan(out)
    if missing.any():
        first = tuple(int(i) for i in np.argwhere(missing)[0])
        raise AssertionError(f"{what}: {int(missing.sum())} elements never written (NaN), first at {first}")
    rtol, atol = tolerance
    scale = float(np.abs(ref).max())
    err = np.abs(out - ref)
    bad = err > rtol * np.abs(ref) + atol * scale
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements off, e.g. at {i}: {out[i]!r} vs {ref[i]!r} "
            f"(max error {err.max() / scale:.3g} of max|ref| {scale:.3g})"
        )
    return float(err.max() / scale)
