"""The fused Metal kernels, run off a Mac: the exact source MLX generates, compiled with g++ against
metal/emulator/metal_shim.h, dispatched on OS threads, compared with float64 numpy; clang checks address spaces.

One driver binary per activation dtype holds every kernel of that dtype (compiled once per session).
"""

import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_mixtral.dtypes import FLOAT_DTYPES
from mlx_mixtral.metal.emulator import runner, verify
from mlx_mixtral.metal.kernels import DOWN, GATE_UP, kernel_text

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to run the generated kernels")

CONFIGS = verify.matrix()


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """Cases, generated sources and compiled drivers for the whole matrix."""
    cache = tmp_path_factory.mktemp("metal_emulator")
    cases = [verify.make_case(c, seed=i) for i, c in enumerate(CONFIGS)]
    kernels = [verify.capture(c, case) for c, case in zip(CONFIGS, cases)]
    by_dtype = {d: [i for i, c in enumerate(CONFIGS) if c.dtype == d] for d in FLOAT_DTYPES}
    binaries = verify.build_all([[k for i in idx for k in kernels[i]] for idx in by_dtype.values()], cache)
    where = {}
    for binary, idx in zip(binaries, by_dtype.values()):
        for j, i in enumerate(idx):
            where[CONFIGS[i]] = (binary, 2 * j)
    return {"cache": cache, "cases": dict(zip(CONFIGS, cases)), "kernels": dict(zip(CONFIGS, kernels)), "where": where}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_generated_kernels_match_float64(emulated, config):
    binary, first = emulated["where"][config]
    errors = verify.check(config, emulated["cases"][config], binary, first, emulated["kernels"][config])
    assert set(errors) == {"gate_up", "down", "pipeline"}


def test_matrix_covers_every_dtype_group_bits_k_and_address_space():
    assert {(c.dtype, c.group_size, c.bits) for c in CONFIGS} == {
        (d, g, b) for d in FLOAT_DTYPES for g in (32, 64, 128) for b in (4, 8)
    }
    assert {c.top_k for c in CONFIGS} == {1, 2, 3}
    assert {(c.top_k, c.small_buffers) for c in CONFIGS} == {(k, s) for k in (1, 2, 3) for s in (True, False)}
    # Row tiles that end part-way (rows not a multiple of rows per threadgroup) in both kernels.
    partial = [
        c
        for c in CONFIGS
        if c.geometry.ffn % (2 * c.rows_per_simdgroup) and c.geometry.hidden % (2 * c.rows_per_simdgroup)
    ]
    assert {c.dtype for c in partial} == set(FLOAT_DTYPES)


def test_generated_signatures_use_constant_buffers_for_small_inputs(emulated):
    """Ids and router weights of fewer than 8 elements arrive in the constant address space."""
    for config, (gate_up, down) in emulated["kernels"].items():
        space = "constant" if config.small_buffers else "device"
        assert next(p for p in gate_up.params if p.name == "indices").type == f"const {space} uint32_t*"
        assert next(p for p in down.params if p.name == "weights").type == f"const {space} float*"
        assert next(p for p in down.params if p.name == "down_w").type == "const device uint32_t*"


@pytest.mark.skipif(
    shutil.which("clang++") is None and shutil.which("clang") is None,
    reason="clang checks address spaces (the CI installs it)",
)
def test_clang_accepts_address_spaces_of_every_kernel(emulated, tmp_path):
    runner.syntax_check([k for pair in emulated["kernels"].values() for k in pair], tmp_path)


# ---------------------------------------------------------------- the harness can fail

SMALL = verify.Config("float16", 32, 4, 2, 3)  # 6 pairs: ids and router weights are constant buffers


def _replace(kind: str, old: str, new: str) -> str:
    body = kernel_text(kind)[0]
    assert body.count(old) == 1, f"{old!r} not found once in {kind}"
    return body.replace(old, new)


BROKEN = {
    # Each lane reads the next group's scale and bias.
    "wrong_scale_group": {
        GATE_UP: _replace(GATE_UP, "const int group = k / GS;", "const int group = (k / GS + 1) % GROUPS;")
    },
    # The last output row of every expert is never written (caught by the NaN fill).
    "last_row_unwritten": {DOWN: _replace(DOWN, "row0 + uint(r) < uint(D)", "row0 + uint(r) < uint(D - 1)")},
    # The last of the k experts is dropped from the sum.
    "drops_last_expert": {DOWN: _replace(DOWN, "slot < TOPK;", "slot < TOPK - 1;")},
    # The lane holding the last run of a row skips it.
    "lanes_skip_tail": {GATE_UP: _replace(GATE_UP, "k < D; k += 32 * RUN", "k + RUN < D; k += 32 * RUN")},
}


@pytest.fixture(scope="session")
def broken(tmp_path_factory):
    cache = tmp_path_factory.mktemp("metal_broken")
    case = verify.make_case(SMALL, seed=7)
    variants = {name: verify.capture(SMALL, case, bodies) for name, bodies in BROKEN.items()}
    hang = verify.capture(
        SMALL,
        case,
        {
            DOWN: _replace(
                DOWN,
                "const float y = metal::simd_sum(acc[r]);",
                "const float y = lane < 16 ? metal::simd_sum(acc[r]) : 0.0f;",
            )
        },
    )
    groups = [*variants.values(), verify.capture(SMALL, case), hang]
    binary = verify.build_all([[k for g in groups for k in g]], cache)[0]
    return {"case": case, "binary": binary, "variants": variants, "correct": groups[-2], "hang": hang}


def test_correct_kernels_pass_in_the_broken_variants_binary(broken):
    index = 2 * len(BROKEN)
    verify.check(SMALL, broken["case"], broken["binary"], index, broken["correct"])


@pytest.mark.parametrize("name", list(BROKEN))
def test_deliberately_wrong_kernel_fails_the_harness(broken, name):
    index = 2 * list(BROKEN).index(name)
    with pytest.raises(AssertionError):
        verify.check(SMALL, broken["case"], broken["binary"], index, broken["variants"][name])


def test_deadlocked_barrier_times_out(broken):
    """A simd_sum some lanes never reach must end the run, not hang the suite."""
    index = 2 * len(BROKEN) + 2
    with pytest.raises(runner.EmulatorTimeout):
        verify.check(SMALL, broken["case"], broken["binary"], index, broken["hang"], timeout=5)


@pytest.mark.skipif(
    shutil.which("clang++") is None and shutil.which("clang") is None,
    reason="clang checks address spaces (the CI installs it)",
)
def test_clang_catches_a_constant_buffer_used_as_device(tmp_path):
    """g++ (address spaces erased) accepts this; Metal and the clang check do not."""
    body = _replace(
        DOWN,
        "const float routed = static_cast<float>(weights[pair]);",
        "const device float* mixes = weights;\n  const float routed = mixes[pair];",
    )
    kernels = verify.capture(SMALL, verify.make_case(SMALL), {DOWN: body})
    with pytest.raises(runner.EmulatorError, match="address-space"):
        runner.syntax_check(kernels, tmp_path)


# ---------------------------------------------------------------- the shim itself

SHIM_PROBE = """
    // Per-threadgroup sum through threadgroup memory, plus simd_sum and simd_shuffle_down.
    threadgroup float partial[64];
    const uint i = thread_position_in_grid.x;
    const uint t = thread_index_in_threadgroup;
    const float v = static_cast<float>(inp[i]);
    partial[t] = v;
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    if (t == 0) {
        float s = 0.0f;
        for (uint j = 0; j < threads_per_threadgroup.x; j++) s += partial[j];
        group_sum[threadgroup_position_in_grid.x] = s;
    }
    simd_total[i] = metal::simd_sum(v);
    next[i] = metal::simd_shuffle_down(v, ushort(1));
"""


def test_shim_runs_partial_threadgroups_and_simdgroups(tmp_path):
    """100 threads in groups of 64: the second group has 36 threads, its second simdgroup 4 lanes."""
    n, group = 100, 64
    kernel = mx.fast.metal_kernel(
        name="shim_probe", input_names=["inp"], output_names=["group_sum", "simd_total", "next"], source=SHIM_PROBE
    )
    x = mx.arange(n, dtype=mx.float32) * 0.5 + 1.0

    def probe(x):
        return kernel(
            inputs=[x],
            grid=(n, 1, 1),
            threadgroup=(group, 1, 1),
            output_shapes=[(2,), (n,), (n,)],
            output_dtypes=[mx.float32] * 3,
            verbose=True,
        )

    (probe_kernel,) = runner.capture(probe, x)
    if shutil.which("clang++") or shutil.which("clang"):
        runner.syntax_check([probe_kernel], tmp_path)  # threadgroup memory in its own address space
    binary = runner.build([probe_kernel], tmp_path)
    out = runner.run(
        binary,
        0,
        probe_kernel,
        (n, 1, 1),
        (group, 1, 1),
        {"inp": x},
        {"group_sum": (2,), "simd_total": (n,), "next": (n,)},
    )
    v = np.array(x, dtype=np.float64)
    np.testing.assert_array_equal(out["group_sum"], [v[:64].sum(), v[64:].sum()])
    simd_of = [(j // 64) * 2 + (j % 64) // 32 for j in range(n)]
    totals = {s: v[[j for j in range(n) if simd_of[j] == s]].sum() for s in set(simd_of)}
    np.testing.assert_array_equal(out["simd_total"], [totals[simd_of[j]] for j in range(n)])
    last = {s: max(j for j in range(n) if simd_of[j] == s) for s in totals}
    expected_next = [v[j] if j == last[simd_of[j]] else v[j + 1] for j in range(n)]
    np.testing.assert_array_equal(out["next"], expected_next)
