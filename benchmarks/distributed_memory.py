"""Peak memory per rank of a sharded model (mx.distributed, ring backend on this machine) vs one process.

    python benchmarks/distributed_memory.py                  # builds a 4-bit synthetic Mixtral once
    python benchmarks/distributed_memory.py --model DIR      # any model dir (MLX or Hugging Face layout)
    python benchmarks/distributed_memory.py --ranks 2 3 4

The default model is a random Mixtral-shaped 4-bit affine (group 64) MLX directory: hidden 1024,
expert FFN 3584, 8 experts (top-2), 16 layers, 16/4 heads, vocab 32000, written once under
benchmarks/out/. Every configuration runs in fresh processes: one process with `load_model`, then
N ranks under `mlx.launch --backend ring` with `load_sharded`. Each process loads, runs one
forward pass over 16 tokens, and reports its peak resident set (`ru_maxrss`), MLX's peak
allocation and the bytes of the parameters it holds. Results go to stdout (a table) and to
benchmarks/out/distributed_memory.json.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CONFIG = {
    "model_type": "mixtral",
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "quantization": {"group_size": 64, "bits": 4, "mode": "affine"},
}


def build_model(path: Path) -> Path:
    """Random weights, quantized layer by layer, saved in mlx-lm's layout (stacked experts)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_mixtral import Mixtral, ModelArgs

    if (path / "model.safetensors").is_file():
        return path
    model = Mixtral(ModelArgs.from_dict(CONFIG))
    nn.quantize(model, 64, 4)
    for layer in model.layers:  # evaluate a layer at a time so the float32 originals never coexist
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    tmp = path.with_name(path.name + ".building")
    tmp.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=1))
    tmp.rename(path)
    return path


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _job(model_dir: str, sharded: bool) -> None:
    """One measured process: load, one forward pass, print a JSON line."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_mixtral import load_model
    from mlx_mixtral.distributed.group import check_same_model, init_group
    from mlx_mixtral.distributed.loader import load_sharded

    start = time.perf_counter()
    if sharded:
        group = init_group()
        check_same_model(group, model_dir)
        model, rank, size = load_sharded(model_dir, group), group.rank(), group.size()
    else:
        model, rank, size = load_model(model_dir), 0, 1
    load_s = time.perf_counter() - start
    tokens = mx.array([[random.Random(0).randrange(1000) for _ in range(16)]])
    mx.eval(model(tokens))
    params = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    print(
        json.dumps(
            {
                "rank": rank,
                "size": size,
                "peak_rss": _peak_rss_bytes(),
                "mlx_peak": mx.get_peak_memory(),
                "params": params,
                "load_s": load_s,
            }
        ),
        flush=True,
    )


def _run(model_dir: Path, ranks: int) -> list[dict]:
    me = str(Path(__file__).resolve())
    if ranks == 1:
        cmd = [sys.executable, me, "--job", str(model_dir)]
    else:
        launcher = Path(sys.executable).with_name("mlx.launch")
        port = random.randint(20000, 60000)
        cmd = [
            str(launcher),
            "-n",
            str(ranks),
            "--backend",
            "ring",
            "-p",
            str(port),
            "--python",
            sys.executable,
            me,
            "--job",
            str(model_dir),
            "--sharded",
        ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(rows) != ranks:
        sys.exit(f"{ranks} rank(s) reported {len(rows)} results:\n{done.stderr}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        _job(args.job, args.sharded)
        return 0

    model_dir = args.model or build_model(OUT / "dist_mixtral_q4")
    disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    results = {"model": str(model_dir), "weights_on_disk": disk, "runs": {}}
    print(f"model {model_dir} ({disk / 1e9:.3f} GB of safetensors)", file=sys.stderr)
    print("| ranks | rank | peak RSS GB | MLX peak GB | params GB | load s |")
    print("|------:|-----:|------------:|------------:|----------:|-------:|")
    for n in [1, *args.ranks]:
        rows = _run(model_dir, n)
        results["runs"][n] = rows
        for r in rows:
            print(
                f"| {n} | {r['rank']} | {r['peak_rss'] / 1e9:.3f} | {r['mlx_peak'] / 1e9:.3f} | "
                f"{r['params'] / 1e9:.3f} | {r['load_s']:.2f} |",
                flush=True,
            )
    OUT.mkdir(exist_ok=True)
    (OUT / "distributed_memory.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
