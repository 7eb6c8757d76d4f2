import sys

from mlx_mixtral.cli.main import main

sys.exit(main())
