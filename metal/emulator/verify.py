"""The emulator test matrix: run the generated kernel source on the CPU and hold it to float64 numpy.

`python -m mlx_mixtral.metal.emulator.verify` runs the whole matrix and prints the max error per
configuration (tests/test_metal_emulated.py runs the same functions under pytest).
Shapes: T tokens, P = T*K pairs, D hidden, F expert hidden, E experts.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_mixtral.dtypes import FLOAT_DTYPES
from mlx_mixtral.metal.emulator import runner
from mlx_mixtral.metal.emulator.numeric import (
    KERNEL_TOLERANCE,
    PIPELINE_TOLERANCE,
    compare,
    down64,
    gate_up64,
    to_f64,
    unpack_affine,
)
from mlx_mixtral.metal.kernels import (
    DOWN,
    GATE_UP,
    SIMDGROUPS,
    ExpertGeometry,
    launch_down,
    launch_gate_up,
    make_kernel,
)

EXPERTS = 4
# (D, F) per group size: multiples of the group size that leave the last 512-value (4-bit) or
# 256-value (8-bit) block of a row partial, and, at group size 128, take two blocks per lane.
SIZES = {32: (160, 96), 64: (320, 128), 128: (640, 128)}


@dataclass(frozen=True)
class Config:
    dtype: str
    group_size: int
    bits: int
    top_k: int
    tokens: int
    rows_per_simdgroup: int = 4
    down_group_size: int | None = None  # mixed precision: down quantized unlike gate/up
    down_bits: int | None = None

    @property
    def geometry(self) -> ExpertGeometry:
        hidden, ffn = SIZES[self.group_size]
        return ExpertGeometry(
            FLOAT_DTYPES[self.dtype],
            self.group_size,
            self.bits,
            hidden,
            ffn,
            EXPERTS,
            self.top_k,
            self.rows_per_simdgroup,
            self.down_group_size,
            self.down_bits,
        )

    @property
    def small_buffers(self) -> bool:
        """MLX passes inputs of fewer than 8 elements (ids, router weights) as `constant` buffers."""
        return self.tokens * self.top_k < 8

    @property
    def label(self) -> str:
        space = "constant" if self.small_buffers else "device"
        down = f"+down:g{self.down_group_size}/{self.down_bits}bit" if self.down_bits else ""
        return (
            f"{self.dtype}/g{self.group_size}/{self.bits}bit{down}/k{self.top_k}/T{self.tokens}"
            f"/R{self.rows_per_simdgroup}/ids:{space}"
        )


def matrix() -> list[Config]:
    """Every dtype x group size x bit width; k = 1, 2, 3 and both buffer address spaces rotate over
    them; three extra configurations use 3 rows per simdgroup so row tiles end part-way, two
    quantize down unlike gate/up (mixed-precision recipes), and four use 1 or 2 rows per simdgroup."""
    tokens_for = {(1, True): 3, (2, True): 3, (3, True): 2, (1, False): 8, (2, False): 4, (3, False): 3}
    configs = []
    for d, dtype in enumerate(FLOAT_DTYPES):
        for c, (group_size, bits) in enumerate(itertools.product((32, 64, 128), (4, 8))):
            k = 1 + (c + d) % 3
            small = (c // 3 + d) % 2 == 0
            configs.append(Config(dtype, group_size, bits, k, tokens_for[(k, small)]))
        configs.append(Config(dtype, 64, 4 if d % 2 else 8, 2, 3, rows_per_simdgroup=3))
    configs.append(Config("bfloat16", 64, 4, 2, 4, down_group_size=32, down_bits=8))
    configs.append(Config("float16", 128, 8, 3, 2, down_group_size=64, down_bits=4))
    # The other rows-per-simdgroup variants the load-time probe builds and may choose (probe.py),
    # at a decode step (constant buffers) and at the largest fused batch (device buffers).
    configs.append(Config("float16", 64, 4, 2, 1, rows_per_simdgroup=1))
    configs.append(Config("bfloat16", 32, 8, 2, 8, rows_per_simdgroup=1))
    configs.append(Config("float32", 128, 4, 2, 1, rows_per_simdgroup=2))
    configs.append(Config("float16", 32, 8, 3, 5, rows_per_simdgroup=2))
    return configs


@dataclass
class Case:
    x: mx.array  # (T, D)
    ids: mx.array  # (P,) uint32, token 0's slots all name the same expert when K > 1
    weights: mx.array  # (P,) float32 router weights
    gate: tuple  # (weight, scales, biases) of (E, F, D)
    up: tuple
    down: tuple  # of (E, D, F)


def make_case(config: Config, seed: int = 0) -> Case:
    g = config.geometry
    rng = np.random.default_rng(seed)
    dtype = FLOAT_DTYPES[config.dtype]

    def experts(n_out: int, n_in: int, kind: str) -> tuple:
        w = mx.array(rng.standard_normal((EXPERTS, n_out, n_in)).astype(np.float32) / np.sqrt(n_in))
        return tuple(mx.quantize(w.astype(dtype), *g.quantization(kind)))

    ids = rng.integers(0, EXPERTS, (config.tokens, config.top_k))  # (T, K)
    ids[0, :] = ids[0, 0]  # repeated expert ids must each count
    logits = rng.standard_normal((config.tokens, config.top_k))
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # (T, K)
    return Case(
        x=mx.array(rng.standard_normal((config.tokens, g.hidden)).astype(np.float32)).astype(dtype),
        ids=mx.array(ids.reshape(-1).astype(np.uint32)),
        weights=mx.array(weights.reshape(-1).astype(np.float32)),
        gate=experts(g.ffn, g.hidden, GATE_UP),
        up=experts(g.ffn, g.hidden, GATE_UP),
        down=experts(g.hidden, g.ffn, DOWN),
    )


def capture(config: Config, case: Case, bodies: dict[str, str] | None = None) -> list[runner.GeneratedKernel]:
    """[gate_up, down] sources as MLX generates them for this configuration (bodies: replacements)."""
    g, bodies = config.geometry, bodies or {}
    up_kernel, down_kernel = (make_kernel(kind, bodies.get(kind)) for kind in (GATE_UP, DOWN))

    def layer(x, ids, weights, *parts):
        h = launch_gate_up(x, ids, parts[0:3], parts[3:6], g, kernel=up_kernel, verbose=True)
        return launch_down(h, ids, weights, parts[6:9], g, kernel=down_kernel, verbose=True)

    kernels = runner.capture(layer, case.x, case.ids, case.weights, *case.gate, *case.up, *case.down)
    if len(kernels) != 2:
        raise runner.EmulatorError(f"{config.label}: expected 2 generated kernels, got {len(kernels)}")
    return kernels


def build_all(groups: list[list[runner.GeneratedKernel]], cache_dir, jobs: int = 2) -> list:
    """Compile one driver per group of kernels, `jobs` g++ processes at a time."""
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda ks: runner.build(ks, cache_dir), groups))


def check(
    config: Config,
    case: Case,
    binary,
    first: int,
    kernels: list[runner.GeneratedKernel],
    timeout: float = runner.RUN_TIMEOUT_S,
) -> dict[str, float]:
    """Run gate_up then down (kernels[0:2], indices first, first+1 in `binary`) against float64.

    down runs on the emulator's own h, so it is checked tightly against float64 math on that h,
    and the pair end to end against float64 math from x.
    """
    g, name = config.geometry, config.dtype
    gate, up, down = (
        unpack_affine(*parts, *g.quantization(kind))
        for parts, kind in ((case.gate, GATE_UP), (case.up, GATE_UP), (case.down, DOWN))
    )
    x, ids, w = to_f64(case.x), np.array(case.ids).astype(np.int64), to_f64(case.weights)
    pairs = config.tokens * config.top_k
    quant = dict(zip(("gate_w", "gate_s", "gate_b"), case.gate)) | dict(zip(("up_w", "up_s", "up_b"), case.up))
    grid, group = g.grid(GATE_UP, config.tokens)
    h = runner.run(
        binary,
        first,
        kernels[0],
        grid,
        group,
        {"x": case.x, "indices": case.ids, **quant},
        {"h": (pairs, g.ffn)},
        timeout,
    )["h"]
    h_exact = gate_up64(x, ids, gate, up, config.top_k)
    errors = {"gate_up": compare(h, h_exact, KERNEL_TOLERANCE[name], f"{config.label} gate_up")}

    h_in = mx.array(h.astype(np.float32)).astype(FLOAT_DTYPES[name])  # exactly the emulator's h
    grid, group = g.grid(DOWN, config.tokens)
    y = runner.run(
        binary,
        first + 1,
        kernels[1],
        grid,
        group,
        {
            "h": h_in,
            "indices": case.ids,
            "weights": case.weights,
            **dict(zip(("down_w", "down_s", "down_b"), case.down)),
        },
        {"out": (config.tokens, g.hidden)},
        timeout,
    )["out"]
    errors["down"] = compare(y, down64(h, ids, w, down, config.top_k), KERNEL_TOLERANCE[name], f"{config.label} down")
    errors["pipeline"] = compare(
        y,
        down64(h_exact, ids, w, down, config.top_k),
        PIPELINE_TOLERANCE[name],
        f"{config.label} gate_up+down vs float64",
    )
    return errors


def threadgroups(config: Config) -> int:
    """Threadgroups the two kernels dispatch for this configuration (emulation cost)."""
    g = config.geometry
    return sum(
        g.grid(kind, config.tokens)[0][1] // SIMDGROUPS * g.grid(kind, config.tokens)[0][2] for kind in (GATE_UP, DOWN)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="directory for compiled drivers (default: a temp dir)")
    args = parser.parse_args(argv)
    configs = matrix()
    cases = [make_case(c, seed=i) for i, c in enumerate(configs)]
    kernels = [capture(c, case) for c, case in zip(configs, cases)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tmp
        runner.syntax_check([k for pair in kernels for k in pair], cache)
        by_dtype = {d: [i for i, c in enumerate(configs) if c.dtype == d] for d in FLOAT_DTYPES}
        binaries = build_all([[k for i in idx for k in kernels[i]] for idx in by_dtype.values()], cache)
        print(f"{'configuration':56} {'gate_up':>9} {'down':>9} {'pipeline':>9} {'TGs':>5} {'s':>5}")
        for binary, idx in zip(binaries, by_dtype.values()):
            for j, i in enumerate(idx):
                start = time.time()
                err = check(configs[i], cases[i], binary, 2 * j, kernels[i])
                print(
                    f"{configs[i].label:56} {err['gate_up']:9.2e} {err['down']:9.2e} {err['pipeline']:9.2e} "
                    f"{threadgroups(configs[i]):5d} {time.time() - start:5.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
