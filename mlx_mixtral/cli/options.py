"""What the commands share: the sampling flags, loading, the one-line error and warning reports,
and the statistics line."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlx_mixtral.cache import KV_BITS, KV_GROUP_SIZES
from mlx_mixtral.errors import ChatTemplateError, MixtralError, OptionError
from mlx_mixtral.experts import KERNEL_CHOICES, KERNELS_ENV
from mlx_mixtral.loader import load
from mlx_mixtral.options import generation_options
from mlx_mixtral.speculative import check_draft_model
from mlx_mixtral.text import argv_text

DEFAULT_MODEL = "mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit"


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """Options shared by `generate` and `chat`."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="MLX or Hugging Face model directory, or a hub id")
    p.add_argument(
        "--max-tokens", type=int, default=max_tokens, help="most tokens to generate (fewer where the context ends)"
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the best one's probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="CTRL repetition penalty (e.g. 1.1)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    p.add_argument(
        "--stop",
        action="append",
        type=argv_text,
        default=None,
        metavar="TEXT",
        help="stop when this text appears (not printed); repeat for several",
    )
    p.add_argument("--system", type=argv_text, default=None, help="system prompt")
    p.add_argument(
        "--chat-template",
        type=argv_text,
        default=None,
        help="mistral-v1, mistral-v3, jinja or Jinja source (default: chosen from the tokenizer); "
        "generate then formats the prompt as a chat",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="shard the model over the processes of `mlx.launch`; rank 0 talks, the others follow",
    )
    add_kernels_arg(p)
    add_memory_args(p)
    add_speculative_args(p)


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft-model",
        default=None,
        metavar="PATH",
        help="speculative decoding: a small model with the same vocabulary drafts tokens the model verifies",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=3,
        metavar="K",
        help="speculative decoding: tokens drafted per verifying forward pass",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=None,
        metavar="N",
        help="speculative decoding: draft the tokens that followed the last N tokens earlier in the text",
    )


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="BYTES",
        help="memory the model may use, e.g. 12GB (default: the GPU's working set on a Mac, the memory "
        "available now elsewhere); a model that does not fit gets its experts offloaded",
    )
    p.add_argument(
        "--expert-cache",
        default=None,
        metavar="SIZE",
        help="offload the experts with this much of them in memory (e.g. 30%% or 8GB) whatever the plan says",
    )
    add_kv_bits_args(p)


def add_kv_bits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-bits",
        type=int,
        choices=KV_BITS,
        default=None,
        help="store the KV cache quantized to this many bits (default: unquantized, the compute dtype)",
    )
    p.add_argument(
        "--kv-group-size",
        type=int,
        choices=KV_GROUP_SIZES,
        default=64,
        help="elements sharing one scale and bias in the quantized KV cache",
    )


def add_kernels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kernels",
        choices=KERNEL_CHOICES,
        default=None,
        help=f"expert kernels: fused Metal kernels, MLX's built-in ops, or auto (fused on a Metal GPU); "
        f"default: ${KERNELS_ENV}, else auto",
    )


# stream_generate keyword -> the flag that sets it
FLAGS = {
    "max_tokens": "--max-tokens",
    "temperature": "--temp",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
    "stop": "--stop",
    "num_draft_tokens": "--num-draft-tokens",
    "prompt_lookup": "--prompt-lookup",
}


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """stream_generate keyword options from the parsed sampling flags, checked before any loading;
    a bad value is an OptionError that names its flag."""
    values = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in FLAGS.items()}
    try:
        return generation_options(**values)
    except OptionError as e:
        raise OptionError(f"{FLAGS[e.option]}: {e}" if e.option in FLAGS else str(e), e.option) from None


def load_for_cli(args: argparse.Namespace):
    """(model, tokenizer, distributed handle or None); a loading problem is a MixtralError, which
    the dispatcher reports in one line."""
    if args.distributed:
        from mlx_mixtral.distributed.model import DistributedModel

        refuse_offload_when_distributed(args)
        refuse_speculation_when_distributed(args)
        dm = DistributedModel.start(args.model, kernels=args.kernels)
        return dm.model, dm.tokenizer, dm
    model, tokenizer = load(args.model, **memory_options(args))
    return model, tokenizer, None


def refuse_offload_when_distributed(args: argparse.Namespace) -> None:
    """Each rank of --distributed holds its own share of the weights in memory; there is no offloading
    there yet, so the memory flags would be ignored: say so instead."""
    for flag in ("--max-memory", "--expert-cache", "--kv-bits"):
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise OptionError(
                f"{flag} does not work with --distributed yet (each rank keeps its shard and a float KV "
                f"cache in memory); leave out {flag}, or run on one machine",
                flag,
            )


def refuse_speculation_when_distributed(args: argparse.Namespace) -> None:
    for flag in ("--draft-model", "--prompt-lookup"):
        if getattr(args, flag[2:].replace("-", "_"), None) is not None:
            raise OptionError(
                f"{flag} does not work with --distributed yet; leave out {flag}, or run on one machine", flag
            )


def load_draft(args: argparse.Namespace, model: Any) -> Any:
    """The --draft-model (None without one), loaded like the model, its vocabulary checked against it."""
    if args.draft_model is None:
        return None
    draft, _ = load(args.draft_model, kernels=args.kernels)
    check_draft_model(draft, model)
    return draft


def memory_options(args: argparse.Namespace) -> dict[str, Any]:
    """load()'s memory and kernel options from the flags; the plan's line goes to stderr."""
    return dict(
        kernels=args.kernels,
        max_memory=args.max_memory,
        max_kv_size=getattr(args, "max_kv_size", None),
        expert_cache=args.expert_cache,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        on_plan=None if getattr(args, "quiet", False) else lambda plan: print(plan.line(), file=sys.stderr, flush=True),
    )


def check_chat_template(tokenizer: Any, template: str | None) -> None:
    """A --chat-template that cannot format a conversation fails at start, not at the first prompt."""
    if template is None:
        return
    try:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], True, template)
    except ValueError as e:  # ChatTemplateError, or the template's own refusal
        raise ChatTemplateError(f"--chat-template: {e}") from None
    if not ids:
        raise ChatTemplateError("--chat-template: the template turns a conversation into no tokens at all")


def report(prog: str, error: MixtralError) -> int:
    """Print a user-facing error as one line on stderr; the exit status it calls for."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return error.exit_status


@contextmanager
def warnings_as_lines(prog: str) -> Iterator[None]:
    """While a command runs, every warning is one line on stderr, `<prog>: warning: <message>`
    (not Python's two, file and source line). This package's ResourceWarnings (memory) are shown
    too; Python hides that category by default."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.filterwarnings("default", category=ResourceWarning, module=r"mlx_mixtral(\.|$)")
        warnings.showwarning = show
        yield


def one_line(e: BaseException) -> str:
    """An error message on one line (some name a file and quote a multi-line parser message)."""
    return " ".join(str(e).split())


def format_stats(r: Any, model: Any = None) -> str:
    """The statistics line of an answer; with an offloading model, its expert-cache figures too."""
    line = (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | generation: {r.generation_tokens} "
        f"tokens, {r.generation_tps:.1f} tok/s | peak memory: {r.peak_memory:.3f} GB"
    )
    if r.draft_tokens:
        line += (
            f" | drafts: {r.accepted_draft_tokens}/{r.draft_tokens} accepted "
            f"({100 * r.accepted_draft_tokens / r.draft_tokens:.1f}%)"
        )
    offload = getattr(model, "offload", None)
    return line if offload is None else f"{line} | {offload.stats.line()}"
