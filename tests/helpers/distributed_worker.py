"""One rank of the distributed tests, started by `mlx.launch` (or by hand with MLX_RANK/MLX_HOSTFILE).

    python distributed_worker.py OUT_DIR MODEL_DIR[,MODEL_DIR_OF_RANK_1,...] [--steps N]
        [--die RANK:ITEMS] [--hang RANK:ITEMS] [--diverge]

Loads this rank's shard of the model, then rank 0 leads a greedy request that its consumer stops
early, one that fails on every rank, one that checks the ranks agree on tokens (`--diverge` makes
them disagree), then a full greedy request whose tokens and logits go to OUT_DIR/rank0.npz; the
other ranks follow. The later requests only work if the ranks stayed in step. `--die 1:2` makes rank 1 exit
abruptly after its second item, as a crashed machine would; `--hang 1:2` makes it stop answering.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_mixtral.distributed.group import check_same_model, follow, init_group, lead, release_followers
from mlx_mixtral.distributed.loader import load_sharded
from mlx_mixtral.distributed.sharding import shard_summary
from mlx_mixtral.errors import DistributedError, LoadError, ShardError

PROMPT = [1, 17, 93, 5, 64, 101, 3, 77, 12, 45, 8]


def greedy(model, prompt: list[int], steps: int):
    """Yield {"token", "logits"}: first the prompt's prefill (logits at every position), then one
    token at a time through the KV cache, always taking the most likely token."""
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[0]  # (L, V)
    for _ in range(steps):
        token = int(mx.argmax(logits[-1]).item())
        yield {"token": token, "logits": np.array(logits)}
        logits = model(mx.array([[token]]), cache=cache)[0]  # (1, V)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("models")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--die", default=None)
    parser.add_argument("--hang", default=None)
    parser.add_argument("--diverge", action="store_true")
    args = parser.parse_args()

    group = init_group()
    rank = group.rank()
    dirs = args.models.split(",")
    model_dir = dirs[rank] if len(dirs) > 1 else dirs[0]
    die_rank, die_after = map(int, args.die.split(":")) if args.die else (-1, 0)
    hang_rank, hang_after = map(int, args.hang.split(":")) if args.hang else (-1, 0)
    check_same_model(group, model_dir)
    model = load_sharded(model_dir, group)
    print(shard_summary(model.shard_plan, rank), file=sys.stderr, flush=True)

    def run(request):
        for i, item in enumerate(greedy(model, request["prompt"], request["steps"])):
            if rank == die_rank and i == die_after:
                print(f"worker rank {rank}: simulated crash", file=sys.stderr, flush=True)
                os._exit(5)
            if rank == hang_rank and i == hang_after:
                time.sleep(3600)  # alive, sockets open, but silent: a hung rank
            yield item

    def fail(request):
        yield {"token": 7}
        raise ValueError("bad request")  # on every rank alike, like an invalid option would

    def diverge(request):
        yield {"token": 7 + (rank if args.diverge else 0)}

    handlers = {"greedy": run, "fail": fail, "diverge": diverge}
    token_of = lambda item: item["token"]  # noqa: E731
    if rank != 0:
        follow(group, handlers, token_of)
        return 0
    for i, _ in enumerate(lead(group, {"op": "greedy", "prompt": PROMPT[:5], "steps": 5}, handlers, token_of)):
        if i == 1:
            break  # rank 0's consumer stops early; the followers must stop at the same item
    try:
        list(lead(group, {"op": "fail"}, handlers, token_of))
    except ValueError:
        pass  # the followers saw the same failure and wait for the next request
    list(lead(group, {"op": "diverge"}, handlers, token_of))
    items = list(lead(group, {"op": "greedy", "prompt": PROMPT, "steps": args.steps}, handlers, token_of))
    release_followers(group)
    np.savez(
        os.path.join(args.out, "rank0.npz"),
        tokens=np.array([it["token"] for it in items]),
        prefill=items[0]["logits"],
        steps=np.stack([it["logits"][-1] for it in items]),
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DistributedError, LoadError, ShardError) as e:
        print(f"worker: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
