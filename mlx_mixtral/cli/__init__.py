"""`mlx-mixtral <command>`: dispatch.py dispatches, options.py holds what the commands share, and each
command has its own module."""

from mlx_mixtral.cli.dispatch import main

__all__ = ["main"]
