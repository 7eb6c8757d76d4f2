"""The argument parser every command uses: one help layout and one way to report a usage error.

Help states each option's default once: "(default: X)" is added unless the option is required, has
no default, or its help already says what the default is. A usage error (an unknown flag, a missing
required one, a value of the wrong type) is an `OptionError`, so the dispatcher prints it like
every other error, as one line with the command's prefix, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap

from mlx_mixtral.errors import OptionError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        no_default = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "default" in help_ or action.required or not action.option_strings or no_default:
            return help_
        return f"{help_} (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Hub ids and flags keep their hyphens on one line (argparse would wrap "mlx-|community/...").
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class CommandParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors, and commands' own parser.error calls
        raise OptionError(f"{' '.join(message.split())} (see '{self.prog} --help')")


def command_parser(prog: str, description: str) -> CommandParser:
    return CommandParser(prog=prog, description=description, formatter_class=_HelpFormatter)


def output_file(text: str) -> str:
    """argparse type of a file a command writes at its end: one that cannot be written is refused
    at the start, not after the work. Probed by opening it for appending (a new file is removed
    again), which asks the filesystem itself: permissions, read-only mounts, /proc."""
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file name" if text else "empty file name")
    existed = os.path.lexists(text)
    try:
        with open(text, "a"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot be written ({e.strerror})") from None
    if not existed:
        os.unlink(text)
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value
