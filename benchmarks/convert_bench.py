"""Converter benchmark: peak memory and wall time against mlx_lm.convert, and recipe quality.

    python benchmarks/convert_bench.py             # 1.58 GB bf16 Mixtral-shaped checkpoint -> 4-bit
    python benchmarks/convert_bench.py --recipes   # KL of each quantization recipe on a small model

The first run builds a random bfloat16 Mixtral-shaped Hugging Face checkpoint with synthetic.py
(hidden 1024, expert FFN 3584, 8 experts, 8 layers, vocab 32000 = 1.58 GB; per-expert `w1/w2/w3`
names, 4 shards + index, Mixtral's tokenizer.model) under benchmarks/out/ and reuses it afterwards.
Each converter then runs in its own child process; peak RSS is that child's `ru_maxrss` from
`os.wait4`, wall time includes interpreter start-up for both. Results go to stdout and to
benchmarks/out/convert_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import Shape, write_checkpoint  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
SHAPE = Shape(hidden=1024, ffn=3584, experts=8, top_k=2, layers=8, heads=16, kv_heads=4)


def measure(cmd: list[str]) -> dict:
    """Run one command as a child; its own peak RSS (not the largest of all children so far)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr.decode()[-2000:]}")
    # ru_maxrss is in kilobytes on Linux, bytes on macOS
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"wall_s": wall, "peak_rss_gb": rss / 1e9}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def bench(repeat: int) -> dict:
    src = write_checkpoint(OUT / "bench_hf_mixtral_bf16", SHAPE)
    src_bytes = _dir_size(src)
    for f in src.glob("*.safetensors"):  # same warm page cache for both converters
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    runs = {
        "mlx-lm": lambda dst: [
            sys.executable,
            "-m",
            "mlx_lm",
            "convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(dst),
            "-q",
            "--q-bits",
            "4",
            "--q-group-size",
            "64",
        ],
        "mlx-mixtral": lambda dst: [
            sys.executable,
            "-m",
            "mlx_mixtral.convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(dst),
            "-q",
            "--q-bits",
            "4",
            "--q-group-size",
            "64",
            "--no-progress",
        ],
    }
    results: dict = {name: [] for name in runs}
    for _ in range(repeat):
        for name, cmd in runs.items():
            dst = OUT / f"bench_{name}_4bit"
            shutil.rmtree(dst, ignore_errors=True)
            r = measure(cmd(dst))
            r["output_gb"] = _dir_size(dst) / 1e9
            results[name].append(r)
            shutil.rmtree(dst, ignore_errors=True)
    best = {
        name: {
            "wall_s": min(r["wall_s"] for r in rs),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
            "output_gb": rs[0]["output_gb"],
        }
        for name, rs in results.items()
    }
    ours, theirs = best["mlx-mixtral"], best["mlx-lm"]
    summary = {
        "source_gb": src_bytes / 1e9,
        "runs": results,
        "best": best,
        "rss_ratio": ours["peak_rss_gb"] / theirs["peak_rss_gb"],
        "wall_ratio": ours["wall_s"] / theirs["wall_s"],
    }
    print(f"source: {summary['source_gb']:.2f} GB bfloat16 ({src}), 4-bit affine, group 64, best of {repeat}")
    print(f"{'converter':<12} {'wall s':>8} {'peak RSS GB':>12} {'output GB':>10}")
    for name, r in best.items():
        print(f"{name:<12} {r['wall_s']:8.2f} {r['peak_rss_gb']:12.3f} {r['output_gb']:10.3f}")
    print(
        f"mlx-mixtral / mlx-lm: peak RSS {summary['rss_ratio']:.2f}x (target <= 0.35x), "
        f"wall {summary['wall_ratio']:.2f}x (target <= 1.0x)"
    )
    return summary


def recipes() -> dict:
    """KL(float || quantized) of the next-token distribution for uniform settings and each recipe
    on a small random Mixtral with Mixtral-8x7B's proportions (attention ~3% of the weights)."""
    import mlx.core as mx
    import numpy as np
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from mlx_mixtral import load_model
    from mlx_mixtral.convert import RECIPES, convert
    from mlx_mixtral.convert.card import model_stats

    base = OUT / "recipes"
    shutil.rmtree(base, ignore_errors=True)
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=896,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # random init gives near-uniform outputs; sharpen them to a trained model's entropy
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(base / "hf")
    ids = mx.array(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 64)))

    def logprobs(path):
        x = np.asarray(load_model(path)(ids), dtype=np.float64)
        x -= x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref = logprobs(base / "hf")
    print(
        f"reference entropy {float(-(np.exp(ref) * ref).sum(-1).mean()):.2f} nats "
        f"(uniform: {np.log(cfg.vocab_size):.2f})"
    )
    settings = {f"uniform {b}-bit": dict(quantize=True, q_bits=b) for b in (2, 3, 4, 6, 8)}
    settings.update({name: dict(recipe=name) for name in RECIPES})
    rows = {}
    for name, kw in settings.items():
        out = convert(base / "hf", base / name.replace(" ", "_"), **kw)
        q = logprobs(out)
        rows[name] = {
            "kl": float((np.exp(ref) * (ref - q)).sum(-1).mean()),
            "bits_per_weight": model_stats(out)["bits_per_weight"],
        }
    print(f"{'setting':<16} {'bits/weight':>11} {'KL (nats)':>10}")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["bits_per_weight"]):
        print(f"{name:<16} {r['bits_per_weight']:11.3f} {r['kl']:10.2e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per converter (best wall, worst RSS)")
    parser.add_argument("--recipes", action="store_true", help="measure recipe quality (KL) instead")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    result = recipes() if args.recipes else bench(args.repeat)
    name = "convert_recipes.json" if args.recipes else "convert_bench.json"
    (OUT / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
