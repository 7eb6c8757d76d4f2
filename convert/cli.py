"""`mlx-mixtral convert` / `python -m mlx_mixtral.convert`: the converter's command line.

The destination path is the answer (stdout); the progress bar, sizes and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from mlx_mixtral.cli.parser import command_parser
from mlx_mixtral.convert.card import describe_quantization, model_stats
from mlx_mixtral.convert.pipeline import Progress, convert
from mlx_mixtral.convert.quant import MODES, RECIPES
from mlx_mixtral.dtypes import FLOAT_DTYPES


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "mlx-mixtral convert",
        "Convert a Hugging Face, Mistral-native or MLX checkpoint (directory or hub id) to MLX "
        "format, streaming one layer at a time.",
    )
    p.add_argument("--hf-path", "--model", required=True, help="source directory or hub id (org/name)")
    p.add_argument("--mlx-path", required=True, help="destination directory (must not exist unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize linear, expert and embedding layers")
    p.add_argument(
        "--q-bits", type=int, default=None, help="bits per weight for affine mode (2, 3, 4, 5, 6, 8; default 4)"
    )
    p.add_argument("--q-group-size", type=int, default=None, help="affine group size (32, 64, 128; default 64)")
    p.add_argument(
        "--q-mode",
        default="affine",
        choices=MODES,
        help="quantization format; mxfp4/mxfp8/nvfp4 fix bits and group size",
    )
    p.add_argument(
        "--recipe",
        "--quant-predicate",
        choices=list(RECIPES),
        default=None,
        metavar="RECIPE",
        help=f"one of {', '.join(RECIPES)} (implies -q); mixed_LOW_HIGH uses LOW bits except HIGH for "
        "embeddings, lm_head, and v_proj/down_proj of the first, last and every third layer; "
        "*_attn also raises every attention projection",
    )
    p.add_argument(
        "--dtype",
        choices=list(FLOAT_DTYPES),
        default=None,
        help="dtype of everything not quantized (default: as stored)",
    )
    p.add_argument("-d", "--dequantize", action="store_true", help="turn a quantized MLX model into floats")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 500MB or 5GB (default 5GB)")
    p.add_argument(
        "--fit",
        default=None,
        metavar="SIZE",
        help="quantize with the best setting (bits or recipe) whose output fits in SIZE, e.g. 20GB",
    )
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--upload-repo", default=None, help="hub repository (org/name) to upload the result to")
    p.add_argument("--revision", default=None, help="hub revision of the source (branch, tag or commit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class _Bar:
    """A tqdm bar over layers with the gigabytes written so far."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.total, unit="layer", desc="converting", file=sys.stderr, leave=False)
        self.bar.set_postfix_str(f"{p.label}, {p.bytes_written / 1e9:.2f}/{p.total_bytes / 1e9:.2f} GB written")
        self.bar.update(p.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _terminate(signum, frame):
    # Turn SIGTERM into an exception so the partial output directory is removed on the way out.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    bar = _Bar(enabled=not args.no_progress)
    try:
        out = convert(
            args.hf_path,
            args.mlx_path,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_mode=args.q_mode,
            recipe=args.recipe,
            dtype=args.dtype,
            dequantize=args.dequantize,
            max_shard_size=args.max_shard_size,
            force=args.force,
            upload_repo=args.upload_repo,
            revision=args.revision,
            progress=bar,
            fit=args.fit,
            on_fit=lambda choice: print(f"mlx-mixtral convert: {choice.line()}", file=sys.stderr, flush=True),
        )
    except KeyboardInterrupt:
        print("mlx-mixtral convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:  # a ConvertError goes on to the dispatcher, which reports it in one line
        bar.close()
    stats = model_stats(out)
    config = json.loads((out / "config.json").read_text())
    print(
        f"{describe_quantization(config)}: {stats['bits_per_weight']:.3f} bits per weight, "
        f"{stats['total_size'] / 1e9:.3f} GB in {stats['shards']} file(s)",
        file=sys.stderr,
    )
    if args.upload_repo:
        print(f"uploaded to https://huggingface.co/{args.upload_repo}", file=sys.stderr)
    print(out)
    return 0
