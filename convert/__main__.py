"""`python -m mlx_mixtral.convert ...` runs the same program as `mlx-mixtral convert ...`."""

import sys

from mlx_mixtral.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
