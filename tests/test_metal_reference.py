"""The fused-kernel layer's Python side: pure-MLX twins vs float64 numpy and vs SwitchGLU's built-in
path, which layers the kernels refuse, the dispatch counts, and (on a Mac only) the GPU itself."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_mixtral.dtypes import dtype_name
from mlx_mixtral.experts import SwitchGLU, SwitchLinear, route
from mlx_mixtral.metal import (
    ExpertGeometry,
    down_reference,
    fused_switch_glu,
    fused_switch_glu_reference,
    gate_up_reference,
    plan,
)
from mlx_mixtral.metal import kernels as K
from mlx_mixtral.metal.dispatches import moe_layer_counts
from mlx_mixtral.metal.emulator.numeric import (
    KERNEL_TOLERANCE,
    PIPELINE_TOLERANCE,
    compare,
    down64,
    gate_up64,
    to_f64,
    unpack_affine,
)
from mlx_mixtral.metal.probe import FALLBACK_AGREEMENT

on_metal = pytest.mark.skipif(not mx.metal.is_available(), reason="needs a Metal GPU")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_own_unpacking_matches_mx_dequantize(bits, group_size):
    w = mx.random.normal((3, 8, 256), key=mx.random.key(bits * group_size))
    packed, scales, biases = mx.quantize(w, group_size, bits)
    ours = unpack_affine(packed, scales, biases, group_size, bits)
    theirs = np.array(mx.dequantize(packed, scales, biases, group_size, bits)).astype(np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    # and both are the weights, up to one quantization step of each group (MLX may clip the top value)
    step = np.repeat(np.abs(np.array(scales)), group_size, axis=-1)
    assert (np.abs(ours - np.array(w)) <= step * 1.001).all()


def _switch_glu(hidden, ffn, experts, dtype, group_size=64, bits=4, seed=0, down=None):
    mx.random.seed(seed)
    mlp = SwitchGLU(hidden, ffn, experts)
    mlp.set_dtype(dtype)
    for name in ("gate_proj", "up_proj", "down_proj"):
        quant = down if name == "down_proj" and down else (group_size, bits)
        setattr(mlp, name, getattr(mlp, name).to_quantized(*quant))
    mx.eval(mlp.parameters())
    return mlp


def _parts(layer):
    return layer.weight, layer.scales, layer.biases


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32], ids=dtype_name)
@pytest.mark.parametrize("bits,group_size,down", [(4, 32, None), (8, 128, None), (4, 64, (32, 8))])
def test_twins_match_float64(dtype, bits, group_size, down):
    mlp = _switch_glu(256, 128, 4, dtype, group_size, bits, down=down)
    x = mx.random.normal((2, 3, 256)).astype(dtype)  # (B, L, D)
    ids = mx.array(np.array([[[1, 1], [0, 3], [2, 1]], [[3, 3], [0, 2], [1, 0]]], np.uint32))  # (B, L, K)
    weights = mx.softmax(mx.random.normal((2, 3, 2)), axis=-1)  # (B, L, K)
    geometry = plan(x, ids, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    gate, up, down = (
        unpack_affine(*_parts(m), m.group_size, m.bits) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    )
    flat_ids, x2 = ids.reshape(-1), x.reshape(-1, 256)
    h = gate_up_reference(x2, flat_ids, _parts(mlp.gate_proj), _parts(mlp.up_proj), geometry)  # (P, F)
    h_exact = gate_up64(to_f64(x2), np.array(flat_ids), gate, up, 2)
    compare(to_f64(h), h_exact, KERNEL_TOLERANCE[dtype_name(dtype)], "gate_up twin")
    y = down_reference(h, flat_ids, weights.reshape(-1), _parts(mlp.down_proj), geometry)  # (T, D)
    w64 = to_f64(weights.reshape(-1))
    compare(
        to_f64(y), down64(to_f64(h), np.array(flat_ids), w64, down, 2), KERNEL_TOLERANCE[dtype_name(dtype)], "down twin"
    )
    full = fused_switch_glu_reference(x, ids, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj)  # (B, L, D)
    compare(
        to_f64(full).reshape(-1, 256),
        down64(h_exact, np.array(flat_ids), w64, down, 2),
        PIPELINE_TOLERANCE[dtype_name(dtype)],
        "fused twin",
    )


# Fused vs built-in agreement: the tolerance the load-time probe accepts (metal/probe.py says why).
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32], ids=dtype_name)
def test_twin_agrees_with_switch_glu_builtin_path(dtype):
    mlp = _switch_glu(128, 192, 8, dtype)
    router = nn.Linear(128, 8, bias=False)
    x = mx.random.normal((2, 1, 128)).astype(dtype)  # (B, L, D): two sequences, one decode step
    ids, weights = route(router(x.astype(mx.float32)), 2)  # (B, L, K)
    builtin = mlp(x, ids, weights)  # a SwitchGLU made by hand takes the built-in ops, also on a Mac
    twin = fused_switch_glu_reference(x, ids, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    assert twin.dtype == builtin.dtype == dtype and twin.shape == builtin.shape
    scale = mx.abs(builtin.astype(mx.float32)).max().item()
    gap = mx.abs(twin.astype(mx.float32) - builtin.astype(mx.float32)).max().item()
    assert gap <= FALLBACK_AGREEMENT[dtype_name(dtype)] * scale, (gap, scale)


def _layers(n_in=128, n_out=128, experts=4):
    return SwitchLinear(n_in, n_out, experts), SwitchLinear(n_in, n_out, experts), SwitchLinear(n_out, n_in, experts)


def _quantized(group_size=64, bits=4, mode="affine"):
    return [layer.to_quantized(group_size, bits, mode) for layer in _layers()]


X = mx.zeros((1, 1, 128), dtype=mx.float16)
IDS = mx.zeros((1, 1, 2), dtype=mx.uint32)
W = mx.full((1, 1, 2), 0.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _layers(),  # unquantized
        lambda: _quantized(32, 4, "mxfp4"),  # not affine
        lambda: _quantized(64, 2),  # bits the kernels do not build
        lambda: _quantized(64, 3),
        lambda: _quantized(64, 6),
        lambda: [_quantized(64, 4)[0], *_quantized(64, 8)[1:]],  # gate and up differ (one kernel reads both)
        lambda: [_quantized(64, 4)[0], *_quantized(32, 4)[1:]],
        lambda: [*_quantized(64, 4)[:2], _quantized(64, 3)[2]],  # down in bits the kernels do not build
    ],
    ids=["unquantized", "mxfp4", "2bit", "3bit", "6bit", "gate-up-bits", "gate-up-groups", "down-3bit"],
)
def test_unhandled_layers_fall_back(make):
    gate, up, down = make()
    assert plan(X, IDS, gate, up, down) is None
    assert fused_switch_glu(X, IDS, W, gate, up, down) is None
    assert fused_switch_glu_reference(X, IDS, W, gate, up, down) is None


def test_unhandled_inputs_fall_back():
    gate, up, down = _quantized()
    assert plan(X.astype(mx.int32), IDS, gate, up, down) is None  # integer activations
    assert plan(mx.zeros((1, 1, 256), mx.float16), IDS, gate, up, down) is None  # wrong hidden size
    assert plan(X, IDS.astype(mx.float32), gate, up, down) is None  # float ids
    assert plan(X, mx.zeros((1, 2, 2), mx.uint32), gate, up, down) is None  # ids for other tokens


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
def test_handled_layers_plan_their_geometry(bits, group_size):
    gate, up, down = _quantized(group_size, bits)
    assert plan(X, IDS, gate, up, down) == ExpertGeometry(
        mx.float16, group_size, bits, 128, 128, 4, 2, down_group_size=group_size, down_bits=bits
    )
    # down quantized unlike gate/up (mixed-precision recipes) is handled by its own kernel
    down = _quantized(32 if group_size != 32 else 128, 12 - bits)[2]
    geometry = plan(X, IDS, gate, up, down)
    assert geometry.quantization(K.GATE_UP) == (group_size, bits)
    assert geometry.quantization(K.DOWN) == (down.group_size, down.bits)


def test_kernel_objects_are_made_once_per_instantiation():
    a = ExpertGeometry(mx.float16, 64, 4, 128, 64, 4, 2)
    b = ExpertGeometry(mx.bfloat16, 64, 4, 128, 64, 4, 2)
    assert K._cached_kernel(K.GATE_UP, a) is K._cached_kernel(K.GATE_UP, a)
    assert K._cached_kernel(K.GATE_UP, a) is not K._cached_kernel(K.GATE_UP, b)
    assert K._cached_kernel(K.GATE_UP, a) is not K._cached_kernel(K.DOWN, a)


def test_dispatch_counts_per_decode_token():
    counts = moe_layer_counts(dtype=mx.float16)
    assert counts["fused"]["dispatches"] == 2 and set(counts["fused"]["kernels"]) == {"CustomKernel"}
    builtin = counts["builtin"]["kernels"]
    assert builtin["GatherQMM"] == 3 and counts["builtin"]["dispatches"] == 13, builtin
    assert counts["router"]["dispatches"] == 6


def test_bench_refuses_without_metal():
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    from mlx_mixtral.metal.bench import compare_fused_builtin

    with pytest.raises(RuntimeError, match="Metal GPU"):
        compare_fused_builtin(hidden=128, ffn=128)


# ---------------------------------------------------------------- on a Mac: the kernels themselves


@on_metal
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32], ids=dtype_name)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (4, 128)])
@pytest.mark.parametrize("tokens,top_k", [(1, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("rows", K.ROW_VARIANTS)
def test_gpu_kernels_match_twin_and_builtin(dtype, bits, group_size, tokens, top_k, rows):
    with mx.stream(mx.gpu):
        mlp = _switch_glu(512, 384, 8, dtype, group_size, bits)
        x = mx.random.normal((tokens, 1, 512)).astype(dtype)
        ids, weights = route(mx.random.normal((tokens, 1, 8)), top_k)
        variant = plan(x, ids, mlp.gate_proj, mlp.up_proj, mlp.down_proj, rows)  # rows per simdgroup
        fused = fused_switch_glu(x, ids, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj, variant)
        twin = fused_switch_glu_reference(x, ids, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        builtin = mlp(x, ids, weights)  # built-in ops: the fused kernels are the model's choice
        name = dtype_name(dtype)
        compare(to_f64(fused), to_f64(twin), KERNEL_TOLERANCE[name], "GPU fused vs twin")
        scale = mx.abs(builtin.astype(mx.float32)).max().item()
        gap = mx.abs(fused.astype(mx.float32) - builtin.astype(mx.float32)).max().item()
        assert gap <= FALLBACK_AGREEMENT[name] * scale
