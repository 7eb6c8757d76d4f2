import sys

from mlx_mixtral.cli.dispatch import main

sys.exit(main())
