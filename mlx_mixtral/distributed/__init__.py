"""One model over several processes or Macs with `mx.distributed` (run under `mlx.launch`).

group.py joining the group and running requests in lock step, sharding.py the tensor-parallel
split, loader.py reading one rank's part of the weights, model.py `DistributedModel` (what the
CLI and server drive).
"""

from mlx_mixtral.distributed.model import DistributedModel
from mlx_mixtral.errors import DistributedError

__all__ = ["DistributedError", "DistributedModel"]
