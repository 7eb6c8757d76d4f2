"""A local assistant on `ChatSession`: answers stream as they are generated, each turn reuses the
KV cache of the conversation so far, and with --session the conversation (messages and cache)
is kept on disk, so the next run continues where this one stopped without recomputing it.

    python examples/assistant.py --model mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit \
        --system "You are a concise assistant." --session ~/.assistant.safetensors

Type a message and press Enter; an empty line or end of input (Ctrl-D) ends the run. Works with
piped input too: `printf 'Hi\\nWhat can you do?\\n' | python examples/assistant.py ...`.
Answers go to stdout; speeds and cache reuse to stderr.
"""

import argparse
import sys
from pathlib import Path

from mlx_mixtral import ChatSession, LoadError, load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit")
    p.add_argument("--system", default=None, help="system prompt (ignored when a saved session is continued)")
    p.add_argument("--session", type=Path, default=None, help="file to continue from and save to")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temp", type=float, default=0.0)
    args = p.parse_args()

    try:
        model, tokenizer = load(args.model)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    options = dict(max_tokens=args.max_tokens, temperature=args.temp)
    if args.session is not None and args.session.exists():
        chat = ChatSession.load(args.session, model, tokenizer, **options)
        print(f"(continuing {len(chat.messages)} messages from {args.session})", file=sys.stderr)
    else:
        chat = ChatSession(model, tokenizer, system=args.system, **options)

    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        for piece in chat.send(line.strip()):
            print(piece, end="", flush=True)
        print()
        r = chat.last
        print(
            f"(prefilled {r.prompt_tokens} new tokens at {r.prompt_tps:.0f} tok/s; "
            f"{r.generation_tokens} generated at {r.generation_tps:.0f} tok/s)",
            file=sys.stderr,
        )

    if args.session is not None and chat.messages:
        chat.save(args.session)
        print(f"(saved {len(chat.messages)} messages to {args.session})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
