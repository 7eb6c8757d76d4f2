"""`mlx-mixtral <command>`: a thin dispatcher; each command lives in its own module.

stdout carries only answers; progress, statistics, warnings and errors go to stderr, one line each.
"""

from __future__ import annotations

import importlib
import sys

from mlx_mixtral.cli.options import report, warnings_as_lines
from mlx_mixtral.errors import MixtralError

# command -> (module, one-line help); each module exposes `main(argv: list[str]) -> int`.
COMMANDS = {
    "convert": ("mlx_mixtral.convert.cli", "convert a Hugging Face or Mistral checkpoint to MLX format"),
    "generate": ("mlx_mixtral.cli.generate", "generate text from a prompt"),
    "chat": ("mlx_mixtral.cli.chat", "interactive chat in the terminal"),
    "serve": ("mlx_mixtral.cli.serve", "OpenAI-compatible HTTP server with a browser chat page"),
    "bench": ("mlx_mixtral.cli.bench", "measure prefill/decode speed and memory on this machine"),
    "plan": ("mlx_mixtral.cli.plan", "say whether a model fits in memory, before downloading it"),
    "doctor": ("mlx_mixtral.cli.doctor", "report this machine, MLX, memory, disk speed and the Metal kernel probe"),
}


def _usage() -> str:
    lines = ["usage: mlx-mixtral <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'mlx-mixtral <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mlx-mixtral: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        with warnings_as_lines(f"mlx-mixtral {command}"):
            return int(module.main(rest) or 0)
    except MixtralError as e:  # bad input of any kind: one line, no traceback; anything else is a bug
        return report(f"mlx-mixtral {command}", e)


if __name__ == "__main__":
    sys.exit(main())
