"""`mlx-mixtral bench`: prefill and decode speed of a model on this machine, against the
memory-bandwidth roofline of the chip, with the fused Metal kernels on and/or off.

    mlx-mixtral bench --model mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit --kernels both --plot b.png

A decode token must stream the weights it uses (attention, router, the K routed experts, one
embedding row, the output head) plus the KV cache once, so tok/s <= bandwidth / those bytes;
the bytes are counted from the traced decode step (mlx_mixtral.accounting). The table goes to
stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import mlx.core as mx

from mlx_mixtral.bench import accounting
from mlx_mixtral.bench.timing import chip_bandwidth, device_name, fused_vs_builtin, measure_ours, plot, roofline
from mlx_mixtral.cli.options import add_memory_args, memory_options
from mlx_mixtral.cli.parser import command_parser, output_file, positive_float
from mlx_mixtral.errors import OptionError
from mlx_mixtral.loader import load_planned_model
from mlx_mixtral.metal.probe import probe_line

PLOT_FORMATS = (".png", ".pdf", ".svg")


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: lengths must be >= 1")
    return lengths


def _plot_file(text: str) -> str:
    if os.path.splitext(text)[1].lower() not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a file name ending in {', '.join(PLOT_FORMATS)}")
    return output_file(text)


def _parser() -> argparse.ArgumentParser:
    p = command_parser("mlx-mixtral bench", __doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", required=True, help="MLX model directory or hub id")
    p.add_argument(
        "--prompt-lengths",
        type=_parse_lengths,
        default=[128, 512, 2048],
        help="comma-separated context lengths (default 128,512,2048)",
    )
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded after each prompt (default 32)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per length (default 3)")
    p.add_argument(
        "--kernels",
        choices=["on", "off", "both"],
        default="on",
        help="fused Metal expert kernels for decode: on, off, or both (one run each)",
    )
    p.add_argument(
        "--bandwidth", type=positive_float, default=None, help="memory bandwidth in GB/s (overrides the chip table)"
    )
    p.add_argument(
        "--plot",
        type=_plot_file,
        default=None,
        help="write a plot of tok/s against context length (.png, .pdf or .svg)",
    )
    p.add_argument("--json", type=output_file, default=None, help="write the results as JSON")
    add_memory_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.decode_tokens < 1 or args.reps < 1:
        raise OptionError(f"--decode-tokens and --reps must be >= 1, got {args.decode_tokens} and {args.reps}")
    # The bench switches the kernels itself (--kernels on/off/both), so it loads with the built-in ops.
    model = load_planned_model(args.model, **{**memory_options(args), "kernels": "builtin"})
    context = model.args.max_position_embeddings
    longest = max(args.prompt_lengths) + args.decode_tokens
    if context is not None and longest > context:
        raise OptionError(
            f"--prompt-lengths {max(args.prompt_lengths)} + --decode-tokens {args.decode_tokens} tokens go past "
            f"the model's context of {context} tokens"
        )
    name = device_name()
    bandwidth = args.bandwidth if args.bandwidth is not None else chip_bandwidth(name)
    source = "--bandwidth" if args.bandwidth is not None else ("chip table" if bandwidth else None)
    print(
        f"device: {name} ({mx.default_device()}); bandwidth: "
        + (
            f"{bandwidth:g} GB/s ({source})"
            if bandwidth
            else "unknown (not an Apple chip in the table; pass --bandwidth GB/s)"
        ),
        file=sys.stderr,
    )

    cache = accounting.prefill_cache(model, model.make_cache(), 16)
    account = accounting.account_decode_step(model, cache)
    del cache
    for line in accounting.report_lines(account):
        print(line, file=sys.stderr)
    itemsize = model.model.norm.weight.dtype.size  # the KV cache holds the compute dtype

    metal = mx.metal.is_available()
    settings = ["on", "off"] if args.kernels == "both" else [args.kernels]
    if not metal and args.kernels != "off":
        print("fused kernels need a Metal GPU; this machine runs the built-in ops either way", file=sys.stderr)
        settings = ["off"]
    rows = []
    for setting in settings:
        runs = model.set_kernels("fused" if setting == "on" else "builtin")
        if setting == "on" and runs != "fused":
            print(f"kernels on: the model runs {runs} (see the warning above)", file=sys.stderr)
        measure_ours(model, 16, 2, 1)  # warm-up: first-call allocations and kernel builds
        for length in args.prompt_lengths:
            print(
                f"kernels {setting}: {length}-token prompt + {args.decode_tokens} decode tokens x {args.reps}",
                file=sys.stderr,
            )
            r = measure_ours(model, length, args.decode_tokens, args.reps)
            roof = roofline(bandwidth, account.weights.minimum, model.args, length, itemsize)
            r.update(
                kernels=setting,
                roofline_tps=roof,
                roofline_pct=None if roof is None else 100 * r["decode_tps"] / roof,
            )
            rows.append(r)

    kernel_layer = None
    if metal and args.kernels == "both":
        kernel_layer = fused_vs_builtin(model)
        if "skipped" in kernel_layer:
            print(f"fused vs built-in, one MoE layer: skipped ({kernel_layer['skipped']})", file=sys.stderr)
        else:
            print(f"fused vs built-in, one MoE layer at decode: {probe_line(kernel_layer)}", file=sys.stderr)

    print(
        f"{'kernels':<8} {'context':>7} {'prefill tok/s':>13} {'decode tok/s':>12} {'roofline tok/s':>14} "
        f"{'% roofline':>10} {'peak GB':>8}"
    )
    for r in rows:
        roof = "unknown" if r["roofline_tps"] is None else f"{r['roofline_tps']:.1f}"
        pct = "unknown" if r["roofline_pct"] is None else f"{r['roofline_pct']:.1f}"
        print(
            f"{r['kernels']:<8} {r['prompt_tokens']:>7} {r['prefill_tps']:>13.1f} {r['decode_tps']:>12.1f} "
            f"{roof:>14} {pct:>10} {r['peak_gb']:>8.2f}"
        )

    result = {
        "model": str(args.model),
        "device": name,
        "backend": str(mx.default_device()),
        "bandwidth_gbs": bandwidth,
        "bandwidth_source": source,
        "mlx": mx.__version__,
        "decode_step": {
            "weight_bytes": account.weights.bytes_read,
            "minimum_bytes": account.weights.minimum,
            "ratio": account.weights.ratio,
            "primitives": account.primitives,
            "primitives_per_layer": account.primitives_per_layer,
            "host_ms": account.host_ms,
        },
        "runs": rows,
        "fused_vs_builtin_layer": kernel_layer,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(rows, args.plot, title=f"{args.model} on {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
