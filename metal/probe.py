"""Probe and autotune the fused expert kernels on this machine, once per expert geometry.

The kernels have only ever run emulated before they meet a user's Mac, so a model does not use them
until they have proved themselves there. For each distinct expert geometry of a model
(mixed-precision recipes give several; layers the kernels do not handle keep the built-in ops):

1. build every variant (rows per simdgroup R in kernels.ROW_VARIANTS) and run it eagerly, inside a
   guard, on that layer's own weights with random activations, at a pair count below 8 and one
   between 8 and FUSED_MAX_PAIRS: MLX passes inputs of fewer than 8 elements (the ids and router
   weights) as `constant` buffers and larger ones as `device` buffers, so each variant is two
   compiled kernels, and both are built here rather than mid-conversation. A Metal compile error
   only surfaces when the graph is evaluated, as a RuntimeError, hence the eager evaluation;
2. compare each result with the built-in gathered ops (FALLBACK_AGREEMENT); a variant that fails
   to build, fails to run or disagrees is rejected;
3. time the survivors and the built-in path at one decode token with pipelined iterations;
4. choose: "fused" takes the fastest surviving variant, "auto" the fastest of all (the built-in ops
   included). A rejected kernel costs one KernelFallbackWarning line saying why and what runs instead.

Results are kept in the decision cache (decisions.py); on a later load only the chosen variant is
built and checked again (both buffer kinds), so nothing compiles after load there either.
Shapes: T tokens, D hidden, E experts, K experts per token, F expert hidden.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import mlx.core as mx

from mlx_mixtral.dtypes import dtype_name
from mlx_mixtral.errors import KernelFallbackWarning
from mlx_mixtral.experts import FUSED_MAX_PAIRS, route
from mlx_mixtral.metal.decisions import DecisionCache, cache_key
from mlx_mixtral.metal.kernels import METAL, ROW_VARIANTS, ExpertGeometry, Launcher, layer_parts, plan_layer, run_fused

# Fused vs built-in: the built-in path rounds gate, up, silu(gate)*up and each expert's output to
# the activation dtype; the fused path rounds h and the final sum only. Accepted: max|fused - builtin|
# <= 10 ulps of max|builtin| (float16 2^-10, bfloat16 2^-7 per ulp); measured with the pure-MLX twins
# on the CPU over 30 seeds: at most 5.2e-3 (float16) and 4.7e-2 (bfloat16), float32 identical.
FALLBACK_AGREEMENT = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 8e-2}

CONSTANT_BELOW = 8  # MLX passes kernel inputs of fewer elements than this as `constant` buffers
ERROR_CHARS = 160  # of a rejection reason (a Metal compiler log can run to pages)

Timer = Callable[[str, Callable[[], mx.array]], float]  # (label, fn) -> seconds per call of fn


def pipelined_seconds(fn: Callable[[], mx.array], iters: int = 16, rounds: int = 3, clock=time.perf_counter) -> float:
    """Seconds per call of `fn` with calls queued back to back, as decoding queues them (async_eval
    each, one wait at the end), best of `rounds`: what the GPU takes, not one host round trip each."""
    mx.eval(fn())  # built and resident before the clock starts
    best = math.inf
    for _ in range(rounds):
        start = clock()
        outs = []
        for _ in range(iters):
            outs.append(fn())
            mx.async_eval(outs[-1])
        mx.eval(outs)
        best = min(best, (clock() - start) / iters)
    return best


def _pipelined(label: str, fn: Callable[[], mx.array]) -> float:
    return pipelined_seconds(fn)


@dataclass
class Tuner:
    """How the probe runs: which kernels (`launcher`), how it times (`timer`), where results are
    kept (`cache`, None: nowhere), on which device, and the chip name results are filed under.
    The defaults are the real thing on a Mac; tests pass the twins, faulty kernels and fake timers."""

    launcher: Launcher = METAL
    timer: Timer = _pipelined
    cache: DecisionCache | None = field(default_factory=DecisionCache)
    device: mx.Device | mx.DeviceType = mx.gpu
    chip: str | None = None  # None: this machine's (bench.timing.device_name)
    seed: int = 0

    def chip_name(self) -> str:
        if self.chip is None:
            from mlx_mixtral.bench.timing import device_name

            self.chip = device_name()
        return self.chip


def default_tuner() -> Tuner:
    """The tuner a model's load uses: the Metal kernels, pipelined timing, the user's decision cache."""
    return Tuner()


@dataclass
class Variant:
    """One rows-per-simdgroup variant's probe: `error` says why it was rejected (None: it passed)."""

    rows_per_simdgroup: int
    error: str | None = None
    max_error: float | None = None  # max |fused - builtin| / max |builtin| over the probed pair counts
    us: float | None = None  # microseconds per MoE layer at one decode token (survivors only)


@dataclass
class ProbeResult:
    """What the probe found for one geometry (kept in the decision cache as asdict(...))."""

    geometry: str  # ExpertGeometry.label
    tolerance: float
    builtin_us: float | None
    variants: list[Variant]

    @classmethod
    def from_json(cls, data) -> ProbeResult | None:
        """A cached result, or None if it does not have this shape (then it is probed again)."""
        try:
            variants = [Variant(**v) for v in data["variants"]]
            return cls(data["geometry"], float(data["tolerance"]), data["builtin_us"], variants)
        except (KeyError, TypeError, ValueError):
            return None

    def summary(self) -> dict:
        """What a person reads: what "auto" runs, the best fused variant's microseconds per MoE layer
        and max error against the built-in ops', the built-in ops' time, and every variant."""
        fused, auto = self.choose("fused"), self.choose("auto")
        best = next((v for v in self.variants if v.rows_per_simdgroup == fused), None)
        fused_us = None if best is None else best.us
        return {
            "geometry": self.geometry,
            "runs": "builtin" if auto is None else f"fused R={auto}",
            "fused_rows_per_simdgroup": fused,
            "fused_us": fused_us,
            "builtin_us": self.builtin_us,
            "speedup": self.builtin_us / fused_us if fused_us and self.builtin_us else None,
            "max_error": None if best is None else best.max_error,
            "tolerance": self.tolerance,
            "variants": [asdict(v) for v in self.variants],
        }

    def passed(self) -> list[Variant]:
        return [v for v in self.variants if v.error is None]

    def choose(self, choice: str) -> int | None:
        """Rows per simdgroup to run, or None for the built-in ops: "fused" the fastest surviving
        variant, "auto" that one only where it beats the built-in path."""
        passed = self.passed()
        if not passed:
            return None
        best = min(passed, key=lambda v: math.inf if v.us is None else v.us)
        if choice == "auto" and self.builtin_us is not None and best.us is not None and self.builtin_us <= best.us:
            return None
        return best.rows_per_simdgroup


def probe_line(summary: dict) -> str:
    """ProbeResult.summary() as one line of text (for `bench` and `doctor`)."""
    if summary["fused_us"] is None:
        text = f"no fused variant passed; built-in {summary['builtin_us']:.1f} us"
    else:
        text = (
            f"fused R={summary['fused_rows_per_simdgroup']} {summary['fused_us']:.1f} us vs built-in "
            f"{summary['builtin_us']:.1f} us ({summary['speedup']:.2f}x), max error {summary['max_error']:.1e} "
            f"(tolerance {summary['tolerance']:g})"
        )
    rejected = [f"R={v['rows_per_simdgroup']} {v['error']}" for v in summary["variants"] if v["error"]]
    return text + (f"; rejected: {'; '.join(rejected)}" if rejected else "") + f"; auto runs {summary['runs']}"


@dataclass
class _Case:
    x: mx.array  # (T, 1, D)
    indices: mx.array  # (T, 1, K)
    weights: mx.array  # (T, 1, K)
    builtin: mx.array  # (T, 1, D): the built-in ops' answer


def probe_token_counts(top_k: int) -> list[int]:
    """Decode batch sizes whose (token, slot) pair counts fall on each side of MLX's constant-buffer
    threshold, within what the fused path takes: one token (constant buffers when K < 8) and the
    most tokens whose pairs fit in FUSED_MAX_PAIRS (device buffers when that is 8 or more)."""
    counts = [1] if top_k <= FUSED_MAX_PAIRS else []
    most = FUSED_MAX_PAIRS // top_k
    if most * top_k >= CONSTANT_BELOW and (most > 1 or top_k >= CONSTANT_BELOW):
        counts.append(most)
    return sorted(set(counts))


def _cases(mlp, g: ExpertGeometry, seed: int) -> list[_Case]:
    cases = []
    for tokens in probe_token_counts(g.top_k):
        kx, kr = mx.random.split(mx.random.key(seed + tokens))  # own keys: the user's random state is untouched
        x = mx.random.normal((tokens, 1, g.hidden), key=kx).astype(g.dtype)  # (T, 1, D)
        indices, weights = route(mx.random.normal((tokens, 1, g.experts), key=kr), g.top_k)  # (T, 1, K)
        builtin = mlp.builtin(x, indices, weights)  # (T, 1, D)
        mx.eval(x, indices, weights, builtin)
        cases.append(_Case(x, indices, weights, builtin))
    return cases


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _check(mlp, g: ExpertGeometry, cases: list[_Case], launcher: Launcher, tolerance: float) -> Variant:
    """Build and run variant `g` eagerly on every case; reject it on any failure or disagreement."""
    parts = layer_parts(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    worst = 0.0
    for case in cases:
        try:
            out = run_fused(case.x, case.indices, case.weights, parts, g, launcher)  # (T, 1, D)
            mx.eval(out)  # a Metal compile error surfaces here, not at the call
            ref = case.builtin.astype(mx.float32)
            scale = max(mx.abs(ref).max().item(), 1e-30)
            err = mx.abs(out.astype(mx.float32) - ref).max().item() / scale
        except Exception as e:  # whatever goes wrong, the fast path must not take the program down
            return Variant(g.rows_per_simdgroup, error=f"failed to build or run ({_one_line(e)})")
        if not math.isfinite(err) or err > tolerance:
            return Variant(
                g.rows_per_simdgroup,
                error=f"wrong numbers (max error {err:.2g} of the built-in output, above {tolerance:g})",
                max_error=err if math.isfinite(err) else None,
            )
        worst = max(worst, err)
    return Variant(g.rows_per_simdgroup, max_error=worst)


def probe_layer(mlp, dtype: mx.Dtype, top_k: int, tuner: Tuner) -> ProbeResult | None:
    """Build, check and time every variant on one SwitchGLU's experts; None if the kernels do not
    handle the layer."""
    base = plan_layer(mlp.gate_proj, mlp.up_proj, mlp.down_proj, dtype, top_k)
    if base is None or not probe_token_counts(top_k):
        return None
    tolerance = FALLBACK_AGREEMENT[dtype_name(dtype)]
    with mx.stream(tuner.device):
        cases = _cases(mlp, base, tuner.seed)
        variants = [
            _check(mlp, replace(base, rows_per_simdgroup=r), cases, tuner.launcher, tolerance) for r in ROW_VARIANTS
        ]
        decode = cases[0]  # one token
        parts = layer_parts(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for v in variants:
            if v.error is not None:
                continue
            g = replace(base, rows_per_simdgroup=v.rows_per_simdgroup)
            try:
                seconds = tuner.timer(
                    f"fused R={v.rows_per_simdgroup}",
                    partial(run_fused, decode.x, decode.indices, decode.weights, parts, g, tuner.launcher),
                )
            except Exception as e:  # passed once, failed when run again: as unusable as a build failure
                v.error = f"failed while timed ({_one_line(e)})"
                continue
            v.us = 1e6 * seconds
        builtin_us = 1e6 * tuner.timer("builtin", partial(mlp.builtin, decode.x, decode.indices, decode.weights))
    return ProbeResult(base.label, tolerance, builtin_us, variants)


def probe_distinct(moe: list[tuple], top_k: int, tuner: Tuner) -> list[ProbeResult]:
    """A fresh probe of each distinct geometry among `moe` ((SwitchGLU, activation dtype) per MoE
    layer), on its first layer: what `bench` and `doctor` report."""
    results: dict[str, ProbeResult | None] = {}
    for mlp, dtype in moe:
        g = plan_layer(mlp.gate_proj, mlp.up_proj, mlp.down_proj, dtype, top_k)
        if g is not None and g.label not in results:
            results[g.label] = probe_layer(mlp, dtype, top_k, tuner)
    return [r for r in results.values() if r is not None]


def _rebuild(mlp, base: ExpertGeometry, result: ProbeResult, rows: int, tuner: Tuner) -> bool:
    """A cached choice is built and checked again (both buffer kinds) before it runs; a failure is
    recorded in `result`. True when it passed."""
    with mx.stream(tuner.device):
        again = _check(
            mlp, replace(base, rows_per_simdgroup=rows), _cases(mlp, base, tuner.seed), tuner.launcher, result.tolerance
        )
    if again.error is None:
        return True
    for i, v in enumerate(result.variants):
        if v.rows_per_simdgroup == rows:
            result.variants[i] = again
    return False


def _warning(result: ProbeResult, layers: int, rows: int | None) -> str | None:
    rejected = [v for v in result.variants if v.error is not None]
    if not rejected:
        return None
    names = ", ".join(f"R={v.rows_per_simdgroup}" for v in rejected)
    instead = "MLX's built-in ops" if rows is None else f"the fused R={rows} variant"
    plural = "s" if layers != 1 else ""
    return (
        f"fused expert kernel {names} rejected for {layers} MoE layer{plural} ({result.geometry}): "
        f"R={rejected[0].rows_per_simdgroup} {rejected[0].error}; {'they run' if layers != 1 else 'it runs'} {instead}"
    )


def choose_kernels(
    moe: list[tuple], top_k: int, choice: str, tuner: Tuner | None = None
) -> list[ExpertGeometry | None]:
    """The fused instantiation each MoE layer runs (None: built-in ops) for `choice` "auto" or "fused".

    `moe` lists (SwitchGLU, activation dtype) per MoE layer. Each distinct geometry is probed once,
    on the first layer that has it, or read from the decision cache and rebuilt.
    """
    tuner = tuner or default_tuner()
    geometries = [plan_layer(m.gate_proj, m.up_proj, m.down_proj, dtype, top_k) for m, dtype in moe]
    unhandled = sum(g is None for g in geometries)
    if choice == "fused" and unhandled:
        warnings.warn(
            f"kernels='fused': {unhandled} of {len(moe)} MoE layers are quantized in a way the fused kernels do not "
            "handle (they take 4- or 8-bit affine experts, group size 32, 64 or 128); those run MLX's built-in ops",
            KernelFallbackWarning,
            stacklevel=2,
        )
    chosen: dict[str, ExpertGeometry | None] = {}
    for (mlp, _), base in zip(moe, geometries):
        if base is None or base.label in chosen:
            continue
        rows, result = _decide(mlp, base, choice, tuner)
        chosen[base.label] = None if rows is None else replace(base, rows_per_simdgroup=rows)
        layers = sum(g is not None and g.label == base.label for g in geometries)
        message = None if result is None else _warning(result, layers, rows)
        if message:
            warnings.warn(message, KernelFallbackWarning, stacklevel=2)
    return [None if g is None else chosen[g.label] for g in geometries]


def _decide(mlp, base: ExpertGeometry, choice: str, tuner: Tuner) -> tuple[int | None, ProbeResult | None]:
    """Rows per simdgroup to run for one geometry (None: built-in ops) and the probe result behind
    it: from the decision cache, the chosen variant rebuilt and checked, else probed afresh."""
    key = cache_key(tuner.chip_name(), base) if tuner.cache is not None else None
    cached = ProbeResult.from_json(tuner.cache.get(key)) if key is not None else None
    result = cached or probe_layer(mlp, base.dtype, base.top_k, tuner)
    if result is None:
        return None, None
    rows, changed = result.choose(choice), cached is None
    while cached is not None and rows is not None and not _rebuild(mlp, base, result, rows, tuner):
        rows, changed = result.choose(choice), True
    if key is not None and changed:
        tuner.cache.put(key, asdict(result))
    return rows, result
