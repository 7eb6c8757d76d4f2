"""One rank running `DistributedModel` (what `--distributed` CLI commands use), started by mlx.launch.

    python distributed_api_worker.py OUT_DIR MODEL_DIR

Rank 0 streams a seeded sampled completion, an unseeded one (rank 0 picks the seed for every rank),
a greedy and a seeded sampled chat of three turns each (the second stopped early by its consumer)
and server-style requests through a prefix cache, then writes what it got to OUT_DIR/api.json; the
other ranks follow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlx_mixtral.distributed.model import DistributedModel
from mlx_mixtral.errors import DistributedError

CHAT = ["Hi there", "Tell me more", "And then?"]
SEEDED_CHAT = dict(temperature=0.9, top_k=20, seed=3)  # the session's seed serves every turn, as in one process


def run_chat(chat) -> dict:
    """The same three turns, on a ChatSession or a DistributedChat."""
    turn1 = "".join(chat.send(CHAT[0], max_tokens=5))
    for i, _ in enumerate(chat.stream(CHAT[1], max_tokens=8)):
        if i == 2:
            break
    turn3 = [r.token for r in chat.stream(CHAT[2], max_tokens=5)]
    return {"turn1": turn1, "turn3": turn3, "messages": chat.messages}


SERVED = [[1, 415, 2936, 9060], [1, 415, 2936, 9060, 285, 1014], [1, 415, 5565]]


def run_served(prefix_cache) -> list[dict]:
    """Requests as a server sends them: the second continues the first, the third shares a prefix;
    the first is stopped early by its (gone) client."""
    out = []
    for i, ids in enumerate(SERVED):
        tokens = []
        for r in prefix_cache.stream(ids, max_tokens=4):
            tokens.append(r.token)
            if i == 0 and len(tokens) == 2:
                break
        out.append({"tokens": tokens, "cached": prefix_cache.cached_tokens})
    return out


def main() -> int:
    out, model_dir = sys.argv[1:3]
    dm = DistributedModel.start(model_dir)
    print(dm.shard_summary(), file=sys.stderr, flush=True)
    if not dm.is_leader:
        return dm.follow()
    result = {
        "sampled": [
            r.token
            for r in dm.stream_generate("The capital of France", max_tokens=8, temperature=0.9, top_k=20, seed=11)
        ],
        "unseeded": [r.token for r in dm.stream_generate("Hello", max_tokens=6, temperature=1.0)],
        "chat": run_chat(dm.chat(temperature=0.0)),
        "seeded_chat": run_chat(dm.chat(**SEEDED_CHAT)),
        "served": run_served(dm.prefix_cache(2)),
    }
    dm.close()
    (Path(out) / "api.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistributedError as e:
        print(f"worker: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
