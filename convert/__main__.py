"""`python -m mlx_mixtral.convert ...` runs the same program as `mlx-mixtral convert ...`."""

import sys

from mlx_mixtral.convert.cli import main

sys.exit(main(sys.argv[1:]))
