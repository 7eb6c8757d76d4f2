"""`mlx-mixtral plan`: will a model fit this machine, and how (from config.json and headers only).

    mlx-mixtral plan --model mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit [--max-memory 12GB] [--json]

For a hub id nothing but config.json and the safetensors headers is fetched: the answer comes before
the download. The table (or JSON) goes to stdout; the exit status is 1 when the model does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys

from mlx_mixtral.cli.options import DEFAULT_MODEL, add_kv_bits_args
from mlx_mixtral.memory.budget import gb
from mlx_mixtral.memory.plan import plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-mixtral plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory or hub id (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--max-memory", default=None, metavar="BYTES", help="the budget, e.g. 12GB (default: this machine's)"
    )
    p.add_argument("--max-kv-size", type=int, default=None, metavar="N", help="KV cache window in tokens")
    add_kv_bits_args(p)
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    result = plan(
        args.model,
        args.max_memory,
        args.max_kv_size,
        revision=args.revision,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
    )
    if args.json:
        print(json.dumps({"model": args.model, **result.as_dict()}, indent=2))
        return 0
    rows = [(part, size) for part, size in sorted(result.parts.items(), key=lambda kv: -kv[1])]
    rows += [(f"KV cache ({result.context} tokens, {result.compute_dtype})", result.kv_bytes),
             ("runtime overhead", result.overhead)]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, size in rows:
        print(f"{name:<{width}}  {gb(size):>10}")
    print(f"{'needed, all resident':<{width}}  {gb(result.needed_resident):>10}")
    print(f"{'budget':<{width}}  {gb(result.budget.bytes):>10}  ({result.budget.source})")
    print(result.line())
    if result.decision == "offload":
        for advice in result.advice:
            print(f"  - {advice}")
    return 1 if result.decision == "refuse" else 0
