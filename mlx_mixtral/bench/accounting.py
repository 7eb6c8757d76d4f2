"""What one decode step costs, read off MLX's traced graph rather than assumed.

Three numbers that hold on any backend, because they describe the graph a step builds, not how
fast this machine runs it:

- weight bytes read per decode token, against the least a Mixtral step must read (every
  attention, router and norm weight, the K routed experts of each layer, one embedding row and
  the output head). Which parameter each primitive reads is taken from `mx.export_to_dot`; a
  gathered read (embedding rows, routed experts) counts only the rows it selects.
- primitives in the step's graph, in all and per decoder layer.
- host time to build the step's graph (the Python forward call, nothing evaluated).

Works on any model shaped like Mixtral's (`model.model.embed_tokens`, `model.layers`,
`model.args` with `num_local_experts`, `num_experts_per_tok`, `vocab_size`) and any cache list
whose entries have `trim(n)`, so this package's models and mlx-lm's are measured alike.
Shapes: D hidden, E experts, K experts per token, V vocab.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_mixtral.model import weight_part

# Primitives that only re-describe memory (no read of their own); a read happens where their
# output is consumed. StopGradient and Depends are identity edges in the graph.
VIEW_PRIMITIVES = frozenset(
    {
        "Reshape",
        "Transpose",
        "Broadcast",
        "Slice",
        "Squeeze",
        "ExpandDims",
        "AsStrided",
        "Flatten",
        "Unflatten",
        "StopGradient",
        "Depends",
    }
)
# Primitives that read only the rows their indices select along the first axis.
GATHERING_PRIMITIVES = frozenset({"Gather", "GatherAxis", "GatherMM", "GatherQMM", "CustomKernel"})

_NODE = re.compile(r'^\{ (\d+) \[label ="([^"]+)"')
_EDGE = re.compile(r'^"?([^"\s]+)"? -> "?([^"\s]+)"?$')


@dataclass
class Graph:
    """A traced graph: primitive labels by node id, and for each array node the primitives reading it."""

    primitives: dict[str, str] = field(default_factory=dict)
    readers: dict[str, list[str]] = field(default_factory=dict)  # array -> primitive nodes
    outputs: dict[str, list[str]] = field(default_factory=dict)  # primitive -> array nodes

    def counts(self) -> Counter:
        return Counter(self.primitives.values())


def trace(outputs: list[mx.array], named: dict[str, mx.array]) -> Graph:
    """The graph behind unevaluated `outputs`, with `named` arrays (parameters) labelled."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step.dot"
        mx.export_to_dot(str(path), *outputs, **named)
        return parse_dot(path.read_text())


def parse_dot(text: str) -> Graph:
    """Parse what `mx.export_to_dot` writes: rectangle nodes are primitives, edges run
    array -> primitive (an input) and primitive -> array (an output)."""
    g = Graph()
    edges = []
    for line in text.splitlines():
        line = line.strip()
        if m := _NODE.match(line):
            g.primitives[m[1]] = m[2]
        elif m := _EDGE.match(line):
            edges.append((m[1], m[2]))
    for src, dst in edges:
        if src in g.primitives:
            g.outputs.setdefault(src, []).append(dst)
        else:
            g.readers.setdefault(src, []).append(dst)
    return g


def _consumers(g: Graph, array: str) -> list[str]:
    """The primitives that really read `array`, looking through view primitives."""
    found, todo, seen = [], [array], set()
    while todo:
        node = todo.pop()
        for prim in g.readers.get(node, []):
            if prim in seen:
                continue
            seen.add(prim)
            if g.primitives[prim] in VIEW_PRIMITIVES:
                todo.extend(g.outputs.get(prim, []))
            else:
                found.append(prim)
    return found


@dataclass
class WeightReads:
    bytes_read: int  # what the traced step reads from parameters
    minimum: int  # the least any implementation must read
    by_kind: dict[str, tuple[int, int]]  # kind -> (read, minimum)
    full_reads_of_gathered: list[str]  # gathered parameters some primitive reads in full

    @property
    def ratio(self) -> float:
        return self.bytes_read / self.minimum


def weight_reads(
    g: Graph, params: dict[str, mx.array], *, tokens: int, top_k: int, num_experts: int, vocab: int, tied: bool = False
) -> WeightReads:
    """Bytes of `params` the traced step reads, and the minimum, for a step over `tokens` tokens.

    A gathering primitive reads min(rows selected, rows) / rows of a parameter: `tokens` rows of
    the embedding (leading dimension V), min(tokens * K, E) of a stacked expert tensor (leading
    dimension E). Every other primitive that consumes a parameter reads all of it, once per
    primitive: an `AsType` of a weight or an ungathered expert matmul shows up as extra bytes.
    """
    num_experts = max(num_experts, 1)  # dense models have no experts
    expert_rows = min(tokens * top_k, num_experts)
    read, minimum = Counter(), Counter()
    full_of_gathered = []
    for name, value in params.items():
        kind = weight_part(name)
        rows = value.shape[0] if value.ndim else 1
        if kind == "embedding":
            least = value.nbytes * min(tokens, rows) // rows + (value.nbytes if tied else 0)
        elif kind == "experts":
            least = value.nbytes * expert_rows // num_experts
        else:
            least = value.nbytes
        minimum[kind] += least
        for prim in _consumers(g, name):
            label = g.primitives[prim]
            if label in GATHERING_PRIMITIVES and rows == vocab and kind == "embedding":
                read[kind] += value.nbytes * min(tokens, rows) // rows
            elif label in GATHERING_PRIMITIVES and rows == num_experts and kind == "experts":
                read[kind] += value.nbytes * expert_rows // num_experts
            else:
                read[kind] += value.nbytes
                if kind in ("experts", "embedding") and not (kind == "embedding" and tied):
                    full_of_gathered.append(f"{name} by {label}")
    kinds = sorted(set(read) | set(minimum))
    return WeightReads(
        sum(read.values()), sum(minimum.values()), {k: (read[k], minimum[k]) for k in kinds}, full_of_gathered
    )


def model_parameters(model: Any) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def _restore(cache: list, logits: mx.array) -> None:
    """Run the traced step once and take its token back out of every cache."""
    mx.eval(logits, [c.state for c in cache])
    for c in cache:
        c.trim(1)


@dataclass
class DecodeAccount:
    weights: WeightReads
    primitives: int  # in the whole step
    primitives_per_layer: int  # in one decoder layer's step
    layer_counts: Counter  # primitive label -> count, one layer
    host_ms: float  # median time to build the whole step's graph


def account_decode_step(model: Any, cache: list, *, host_reps: int = 10, token: int = 1) -> DecodeAccount:
    """Trace one decode step of `model` on top of `cache` (which must hold at least one token),
    count what it reads and builds, and time building it. The cache is left as it was."""
    args = model.args
    params = model_parameters(model)
    tokens = mx.array([[token]], mx.uint32)  # (1, 1)

    logits = model(tokens, cache=cache)  # (1, 1, V), not evaluated
    g = trace([logits], params)
    _restore(cache, logits)

    x = model.model.embed_tokens(tokens)  # (1, 1, D)
    mx.eval(x)
    layer_out = model.layers[0](x, cache=cache[0])
    layer_graph = trace([layer_out], params)
    mx.eval(layer_out, cache[0].state)
    cache[0].trim(1)

    times = []
    for _ in range(host_reps):
        start = time.perf_counter()
        logits = model(tokens, cache=cache)
        times.append(time.perf_counter() - start)
        _restore(cache, logits)

    reads = weight_reads(
        g,
        params,
        tokens=1,
        top_k=args.num_experts_per_tok,
        num_experts=args.num_local_experts,
        vocab=args.vocab_size,
        tied=bool(getattr(args, "tie_word_embeddings", False)),
    )
    layer_counts = layer_graph.counts()
    return DecodeAccount(
        reads, len(g.primitives), sum(layer_counts.values()), layer_counts, statistics.median(times) * 1e3
    )


def prefill_cache(model: Any, cache: list, length: int) -> list:
    """Fill `cache` with `length` arbitrary tokens so a decode step sees a steady-state cache."""
    tokens = (mx.arange(length, dtype=mx.uint32) % 1000 + 10)[None]  # (1, L)
    logits = model(tokens, cache=cache)
    mx.eval(logits, [c.state for c in cache])
    return cache


def _size(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.2f} KB"


def report_lines(account: DecodeAccount) -> list[str]:
    """Lines for a report (the caller prints them)."""
    w = account.weights
    lines = [
        f"weight bytes read per decode token: {w.bytes_read / 1e6:.2f} MB, minimum {w.minimum / 1e6:.2f} MB, "
        f"ratio {w.ratio:.3f}"
    ]
    for kind, (got, least) in w.by_kind.items():
        lines.append(f"  {kind:<10} {_size(got):>10}  (minimum {_size(least)})")
    for item in w.full_reads_of_gathered:
        lines.append(f"  read in full although gathered: {item}")
    lines.append(f"primitives per decode step: {account.primitives}, per layer: {account.primitives_per_layer}")
    lines.append(f"host time to build one decode step's graph: {account.host_ms:.2f} ms")
    return lines
