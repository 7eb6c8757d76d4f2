"""`mlx-mixtral generate`: complete one prompt.

stdout carries only the completion (streamed); prompt and generation speed and peak memory go
to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mlx_mixtral.cli.options import (
    add_sampling_args,
    check_chat_template,
    format_stats,
    load_draft,
    load_for_cli,
    options_from_args,
)
from mlx_mixtral.cli.parser import command_parser
from mlx_mixtral.generate import stream_generate
from mlx_mixtral.options import DEFAULT_MAX_TOKENS
from mlx_mixtral.text import argv_text


def _parser() -> argparse.ArgumentParser:
    p = command_parser("mlx-mixtral generate", __doc__.splitlines()[0])
    p.add_argument("--prompt", required=True, type=argv_text, help="the prompt text ('-' reads it from stdin)")
    add_sampling_args(p, max_tokens=DEFAULT_MAX_TOKENS)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--quiet", action="store_true", help="no memory plan or statistics on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = options_from_args(args)
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer, dm = load_for_cli(args)
    if dm is not None and not dm.is_leader:
        return dm.follow()
    if dm is None:
        options["draft_model"] = load_draft(args, model)
    try:
        check_chat_template(tokenizer, args.chat_template)
        if args.chat or args.system is not None or args.chat_template is not None:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt: Any = tokenizer.apply_chat_template(
                messages + [{"role": "user", "content": prompt_text}], template=args.chat_template
            )
        else:
            prompt = prompt_text
        if dm is not None:
            stream = dm.stream_generate(prompt, **options)
        else:
            stream = stream_generate(model, tokenizer, prompt, **options)
        last = None
        for last in stream:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        if dm is not None:
            dm.close()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    limit = options["max_tokens"]
    if last is not None and last.finish_reason == "length" and (limit is None or last.generation_tokens < limit):
        context = model.args.max_position_embeddings
        print(f"(the answer stopped where the model's context of {context} tokens ends)", file=sys.stderr)
    if last is not None and not args.quiet:
        print(format_stats(last, model), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
