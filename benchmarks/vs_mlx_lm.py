"""Side-by-side benchmark: this package against mlx-lm, same converted model, same process.

    python benchmarks/vs_mlx_lm.py                       # default shape, 4-bit, 8-bit, bfloat16
    python benchmarks/vs_mlx_lm.py --hidden 1024 --ffn 3584 --layers 8 --quants 4bit

1. Writes a random Mixtral-shaped Hugging Face checkpoint (benchmarks/synthetic.py) once.
2. Converts it once per quantization with this package's converter and loads the same directory
   with both runtimes.
3. Checks the logits of both on one prompt (max |difference|; mlx-lm as it runs and mlx-lm cast to
   float32, which is what this package computes in on the CPU backend).
4. Times each package's own generation loop (generate_step, greedy) interleaved run by run, after
   a warm-up: prefill tok/s (prompt in, first token out) and decode tok/s (the next N tokens) at
   each prompt length, with the peak memory of each run (weights + what the run allocated).
5. Counts the traced decode step of each (mlx_mixtral.accounting): weight bytes read per token vs
   the minimum, primitives per layer, host time to build the graph.
Prints a table, writes out/speed/<shape>/results.json and results.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import add_shape_flags, shape_from_args, write_checkpoint  # noqa: E402

from mlx_mixtral.bench import accounting  # noqa: E402
from mlx_mixtral.bench.timing import random_prompt, time_generation  # noqa: E402
from mlx_mixtral.convert import convert  # noqa: E402

QUANTS = {
    "4bit": {"quantize": True, "q_bits": 4},
    "8bit": {"quantize": True, "q_bits": 8},
    "bf16": {"quantize": False, "dtype": "bfloat16"},
}
PACKAGES = ("mlx-mixtral", "mlx-lm")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def convert_once(src: Path, dst: Path, quant: str) -> Path:
    """The converted directory, reused when present (convert() only ever leaves a finished one)."""
    if not dst.is_dir():
        convert(src, dst, q_group_size=64, **QUANTS[quant])
    return dst


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


class Runner:
    """One loaded model and its package's generation loop."""

    def __init__(self, name: str, model_dir: Path):
        self.name = name
        if name == "mlx-mixtral":
            from mlx_mixtral.generate import generate_step
            from mlx_mixtral.loader import load_model

            self.model = load_model(model_dir)
            self._step = lambda ids, n: generate_step(ids, self.model, max_tokens=n)
            self.make_cache = self.model.make_cache
        else:
            from mlx_lm.generate import generate_step
            from mlx_lm.models.cache import make_prompt_cache
            from mlx_lm.utils import load_model

            self.model, _ = load_model(model_dir)
            self._step = lambda ids, n: generate_step(mx.array(ids), self.model, max_tokens=n)
            self.make_cache = lambda: make_prompt_cache(self.model)
        self.weights = weight_bytes(self.model)
        self.error: str | None = None

    def run(self, ids: list[int], decode_tokens: int) -> dict:
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        cpu = time.process_time()
        t = time_generation(self._step(ids, decode_tokens + 1), len(ids), decode_tokens)
        cpu = time.process_time() - cpu  # all threads of this process: less sensitive to other jobs
        peak = mx.get_peak_memory() - base + self.weights
        return {
            "prefill_s": t.prefill_s,
            "decode_s": t.decode_s,
            "cpu_s": cpu,
            "prefill_tps": t.prefill_tps,
            "decode_tps": t.decode_tps,
            "peak_gb": peak / 1e9,
        }


def compare_logits(ours, theirs, vocab: int, length: int = 64) -> dict:
    """max |ours - theirs| over every position of one prompt, with the logits' scale."""
    ids = mx.array([random_prompt(length, vocab, seed=7)])
    a = ours(ids).astype(mx.float32)  # (1, L, V)
    b = theirs(ids).astype(mx.float32)  # (1, L, V)
    diff = mx.abs(a - b)
    same_argmax = mx.mean((a.argmax(-1) == b.argmax(-1)).astype(mx.float32))
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "max_abs_logit": mx.abs(b).max().item(),
        "argmax_agree": same_argmax.item(),
    }


def bench_quant(quant: str, model_dir: Path, args) -> dict:
    runners = {name: Runner(name, model_dir) for name in PACKAGES}
    ours, theirs = runners["mlx-mixtral"], runners["mlx-lm"]
    vocab = ours.model.args.vocab_size
    log(f"{quant}: weights {ours.weights / 1e6:.1f} MB (mlx-mixtral), {theirs.weights / 1e6:.1f} MB (mlx-lm)")
    for r in runners.values():  # warm-up; also finds what cannot run here
        try:
            r.run(random_prompt(16, vocab, seed=1), 2)
        except Exception as e:  # noqa: BLE001 - report any failure of the peer as a table cell
            r.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            log(f"{quant}: {r.name} cannot run: {r.error}")

    result: dict = {
        "quant": quant,
        "dir": str(model_dir),
        "weights_bytes": {n: r.weights for n, r in runners.items()},
        "errors": {n: r.error for n, r in runners.items() if r.error},
        "cases": [],
    }
    for length in args.prompt_lengths:
        ids = random_prompt(length, vocab, seed=length)
        runs: dict[str, list] = {n: [] for n in PACKAGES}
        for rep in range(args.reps):
            order = list(PACKAGES) if rep % 2 == 0 else list(reversed(PACKAGES))
            for name in order:
                r = runners[name]
                if r.error:
                    continue
                slow = runs[name] and runs[name][-1]["prefill_s"] + runs[name][-1]["decode_s"] > args.slow_s
                if slow:  # one run of this case already took longer than --slow-s: fewer repetitions
                    continue
                runs[name].append(r.run(ids, args.decode_tokens))
                last = runs[name][-1]
                log(
                    f"{quant} L={length} rep {rep + 1} {name}: prefill {last['prefill_tps']:.1f} tok/s, "
                    f"decode {last['decode_tps']:.1f} tok/s"
                )
        case = {"prompt_tokens": length, "decode_tokens": args.decode_tokens}
        for name, rs in runs.items():
            if rs:
                case[name] = {
                    "reps": len(rs),
                    "runs": rs,
                    "prefill_tps": statistics.median(x["prefill_tps"] for x in rs),
                    "decode_tps": statistics.median(x["decode_tps"] for x in rs),
                    "peak_gb": max(x["peak_gb"] for x in rs),
                }
        result["cases"].append(case)

    result["logits"] = {}
    if not theirs.error:
        result["logits"]["as each runs"] = compare_logits(ours.model, theirs.model, vocab)
        # The same with this package also computing in bfloat16 (its policy on Apple GPUs for
        # bf16 checkpoints): what is left is summation order, not the dtype.
        from mlx_mixtral.loader import load_model

        result["logits"]["both in bfloat16"] = compare_logits(
            load_model(model_dir, dtype=mx.bfloat16), theirs.model, vocab
        )
    theirs.model.set_dtype(mx.float32)  # the same weights, computed in float32 like ours on the CPU
    try:
        result["logits"]["both in float32"] = compare_logits(ours.model, theirs.model, vocab)
    except Exception as e:  # noqa: BLE001
        result["logits"]["both in float32"] = {"error": str(e).splitlines()[0]}
    error = theirs.error
    theirs.model = None
    theirs = Runner("mlx-lm", model_dir)  # back to the checkpoint's dtype for its accounting
    theirs.error = error

    result["accounting"] = {}
    for name, r in (("mlx-mixtral", ours), ("mlx-lm", theirs)):
        if r.error and name == "mlx-lm":
            continue
        cache = accounting.prefill_cache(r.model, r.make_cache(), 16)
        a = accounting.account_decode_step(r.model, cache, host_reps=args.host_reps)
        w = a.weights
        result["accounting"][name] = {
            "weight_bytes_read": w.bytes_read,
            "minimum_bytes": w.minimum,
            "ratio": w.ratio,
            "by_kind": w.by_kind,
            "read_in_full_although_gathered": w.full_reads_of_gathered,
            "primitives": a.primitives,
            "primitives_per_layer": a.primitives_per_layer,
            "layer_primitive_counts": dict(a.layer_counts),
            "host_ms": a.host_ms,
        }
    del runners
    return result


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(results: list[dict]) -> list[str]:
    lines = [
        f"{'quant':<5} {'metric':<17} {'mlx-mixtral':>11} {'mlx-lm':>9} {'ratio':>6} {'reps':>7} "
        f"{'peak GB ours/theirs':>19}"
    ]
    for res in results:
        err = res["errors"].get("mlx-lm")
        for metric in ("prefill", "decode"):
            for case in res["cases"]:
                ours, theirs = case.get("mlx-mixtral"), case.get("mlx-lm")
                label = f"{metric} @{case['prompt_tokens']}"
                a = ours[f"{metric}_tps"] if ours else None
                b = theirs[f"{metric}_tps"] if theirs else None
                ratio = _fmt(a / b, 2) + "x" if a and b else "-"
                reps = f"{ours['reps'] if ours else 0}/{theirs['reps'] if theirs else 0}"
                peak = f"{_fmt(ours and ours['peak_gb'], 3)}/{_fmt(theirs and theirs['peak_gb'], 3)}"
                lines.append(
                    f"{res['quant']:<5} {label:<17} {_fmt(a):>11} {'n/a' if err else _fmt(b):>9} "
                    f"{ratio:>6} {reps:>7} {peak:>19}"
                )
        if err:
            lines.append(f"{res['quant']:<5} mlx-lm cannot run this model here: {err}")
        for what, d in res["logits"].items():
            if "error" in d:
                lines.append(f"{res['quant']:<5} logits ours vs mlx-lm, {what}: {d['error']}")
            else:
                lines.append(
                    f"{res['quant']:<5} logits ours vs mlx-lm, {what}: max |diff| {d['max_abs_diff']:.2e} "
                    f"(max |logit| {d['max_abs_logit']:.2f}), argmax agree {100 * d['argmax_agree']:.1f}%"
                )
        for name, a in res["accounting"].items():
            lines.append(
                f"{res['quant']:<5} {name:<11} decode step: weight bytes {a['weight_bytes_read'] / 1e6:.2f} MB "
                f"/ minimum {a['minimum_bytes'] / 1e6:.2f} MB = {a['ratio']:.3f}; primitives "
                f"{a['primitives']} ({a['primitives_per_layer']} per layer); graph build "
                f"{a['host_ms']:.2f} ms"
            )
    return lines


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for color, res in enumerate(results):  # one colour per quantization, solid = this package
        for name, style in (("mlx-mixtral", "-"), ("mlx-lm", "--")):
            cases = [c for c in res["cases"] if name in c]
            if not cases:
                continue
            x = [c["prompt_tokens"] for c in cases]
            for ax, metric in zip(axes, ("prefill", "decode")):
                ax.plot(
                    x,
                    [c[name][f"{metric}_tps"] for c in cases],
                    style,
                    color=f"C{color}",
                    marker="o",
                    label=f"{name} {res['quant']}",
                )
    for ax, metric in zip(axes, ("prefill", "decode")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{metric} tok/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_flags(p)
    p.add_argument("--quants", default="4bit,8bit,bf16", help="comma-separated: 4bit, 8bit, bf16")
    p.add_argument("--prompt-lengths", default="128,512,2048")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="timed runs per case and package")
    p.add_argument(
        "--slow-s",
        type=float,
        default=90.0,
        help="after a run longer than this, that package does no more reps of that case",
    )
    p.add_argument("--host-reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "speed")
    args = p.parse_args(argv)
    args.prompt_lengths = [int(x) for x in args.prompt_lengths.split(",")]
    quants = args.quants.split(",")
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        p.error(f"--quants: unknown {bad[0]!r}; expected some of {', '.join(QUANTS)}")
    shape = shape_from_args(args)
    out = args.out / shape.tag()
    out.mkdir(parents=True, exist_ok=True)

    import mlx_lm

    load_before = os.getloadavg()
    started = time.time()
    src = write_checkpoint(args.out / f"hf-{shape.tag()}", shape)
    results = []
    for quant in quants:
        model_dir = convert_once(src, out / quant, quant)
        log(f"{quant}: {model_dir}")
        res = bench_quant(quant, model_dir, args)
        results.append(res)
        mx.clear_cache()
    meta = {
        "shape": shape.__dict__,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": str(mx.default_device()),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
        "wall_s": time.time() - started,
        "settings": {
            "prompt_lengths": args.prompt_lengths,
            "decode_tokens": args.decode_tokens,
            "reps": args.reps,
            "slow_s": args.slow_s,
        },
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    title = (
        f"{shape.tag()} on {platform.machine()} ({mx.default_device()}), mlx {mx.__version__}, "
        f"mlx-lm {mlx_lm.__version__}"
    )
    plot(results, out / "results.png", title)
    print(
        f"# {title}; load avg {load_before[0]:.1f} -> {meta['machine']['load_avg_after'][0]:.1f}; "
        f"{meta['wall_s'] / 60:.1f} min"
    )
    print("\n".join(table(results)))
    print(f"# JSON: {out / 'results.json'}  plot: {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
