"""What the commands that load a model share: the sampling options, loading with a one-line error,
and the statistics line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mlx_mixtral.loader import LoadError, load
from mlx_mixtral.sampling import make_logits_processors, make_sampler

DEFAULT_MODEL = "mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit"


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """Options shared by `generate` and `chat`."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="MLX or Hugging Face model directory, or a hub id")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the best one's probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="CTRL repetition penalty (e.g. 1.1)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop when this text appears (not printed); repeat for several",
    )
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--chat-template",
        default=None,
        help="mistral-v1, mistral-v3, jinja or Jinja source (default: chosen from the tokenizer)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="shard the model over the processes of `mlx.launch`; rank 0 talks, the others follow",
    )


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """stream_generate keyword options from the parsed arguments, checked before any loading."""
    # Building them raises the library's ValueError naming the bad option.
    make_sampler(args.temp, args.top_p, args.top_k, args.min_p)
    make_logits_processors(args.repetition_penalty)
    if args.max_tokens is not None and args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def load_for_cli(args: argparse.Namespace, prog: str):
    """(model, tokenizer, distributed handle or None); a loading problem exits with one line."""
    try:
        if args.distributed:
            from mlx_mixtral.distributed.model import DistributedModel

            dm = DistributedModel.start(args.model)
            return dm.model, dm.tokenizer, dm
        model, tokenizer = load(args.model)
        return model, tokenizer, None
    except (LoadError, ValueError, OSError) as e:  # LoadError, TokenizerError, ConfigError are ValueErrors
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


def one_line(e: Exception) -> str:
    """An error message on one line (some name a file and quote a multi-line parser message)."""
    return " ".join(str(e).split())


def format_stats(r: Any) -> str:
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | generation: {r.generation_tokens} "
        f"tokens, {r.generation_tps:.1f} tok/s | peak memory: {r.peak_memory:.3f} GB"
    )
