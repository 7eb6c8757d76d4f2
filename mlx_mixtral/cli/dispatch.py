"""`mlx-mixtral <command>`: a thin dispatcher; each command lives in its own module.

stdout carries only answers; progress, statistics and warnings go to stderr, one line each. Every
way a command can fail on its input ends here as one line, `mlx-mixtral <command>: error: ...`,
and an exit status: 1, or 2 for a usage error. A reader that closes the pipe early
(`mlx-mixtral generate ... | head`) ends the command quietly with status 141, as a program killed
by SIGPIPE ends in the shell.
"""

from __future__ import annotations

import importlib
import os
import sys

from mlx_mixtral.cli.options import report, warnings_as_lines
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.text import configure_stdio

BROKEN_PIPE_STATUS = 141  # 128 + SIGPIPE

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
        names = ", ".join(COMMANDS)
        print(
            f"mlx-mixtral: error: unknown command {command!r} (commands: {names}; see 'mlx-mixtral --help')",
            file=sys.stderr,
        )
        return 2
    configure_stdio()
    module = importlib.import_module(COMMANDS[command][0])
    try:
        with warnings_as_lines(f"mlx-mixtral {command}"):
            status = int(module.main(rest) or 0)
        sys.stdout.flush()  # a closed pipe shows here at the latest, not at interpreter exit
        return status
    except MixtralError as e:  # bad input of any kind: one line, no traceback; anything else is a bug
        return report(f"mlx-mixtral {command}", e)
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE_STATUS


def _discard_stdout() -> None:
    """Point stdout at /dev/null: the reader is gone, and what is still buffered would fail again
    when Python flushes it on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor behind stdout (an embedding, a test)
        pass


if __name__ == "__main__":
    sys.exit(main())
