"""Expert offloading on a Mixtral-shaped 4-bit checkpoint: decode speed, hit rate, bytes read and
stall per token at several expert-cache budgets, with and without prefetch, under three routings;
the eviction policies compared on the same traces; a projection for Mixtral-8x7B on 16-32 GB Macs.

    python benchmarks/offload.py                      # 1.65 GB model under benchmarks/out/, ~15 min here
    python benchmarks/offload.py --layers 8 --tokens 6   # a quick look

Reads come from the disk, not the page cache: the expert store runs with cold=True, which asks
the kernel (posix_fadvise DONTNEED) to drop every range it read, and each run starts by dropping
the model's files the same way. Routings:
  model     the checkpoint's own (random) routers, and the prefetcher's own guess (next router on
            the current hidden state), whose accuracy is measured;
  uniform   every token's K experts drawn uniformly at random per layer (the worst case for a cache);
  locality  a trace where each of the previous token's experts is kept with probability p, else
            replaced by a uniform draw; p = 0.18 makes the first choice repeat for ~28% of
            consecutive tokens against 12.5% for uniform routing, about the twofold excess the
            Mixtral paper (Jiang et al. 2024, arXiv 2401.04088, Sec. 5 and Fig. 10) shows for the
            middle and last layers.
For the two forced routings the prefetcher is given the trace's next-layer choice with probability
0.8 and a uniform guess otherwise: the speculative-loading accuracy mixtral-offloading reports
(> 80%, Eliseev & Mazur 2023) stands in for routers that, with random weights, carry no signal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers.random_quantized import write_random_quantized  # noqa: E402

import mlx_mixtral.model as model_module  # noqa: E402
from mlx_mixtral import load_model  # noqa: E402
from mlx_mixtral.generate import generate_step  # noqa: E402
from mlx_mixtral.memory.plan import plan  # noqa: E402
from mlx_mixtral.offload.cache import LayerCache  # noqa: E402
from mlx_mixtral.offload.load import load_offloaded  # noqa: E402
from mlx_mixtral.offload.policy import POLICIES  # noqa: E402

OUT = REPO / "benchmarks" / "out" / "offload"
REPEAT_P = 0.18
GUESS_ACCURACY = 0.8


class Trace:
    """Forced routing: layer -> (token step) -> K distinct experts, generated on demand."""

    def __init__(self, kind: str, layers: int, experts: int, k: int, seed: int):
        self.kind, self.experts, self.k = kind, experts, k
        self.rng = np.random.default_rng(seed)
        self.steps: list[list[np.ndarray]] = [[] for _ in range(layers)]

    def at(self, layer: int, step: int) -> np.ndarray:
        seq = self.steps[layer]
        while len(seq) <= step:
            seq.append(self._next(seq[-1] if seq else None))
        return seq[step]

    def _next(self, previous: np.ndarray | None) -> np.ndarray:
        if self.kind == "uniform" or previous is None:
            return self.rng.choice(self.experts, self.k, replace=False)
        out = []
        for e in previous:
            if self.rng.random() < REPEAT_P and e not in out:
                out.append(int(e))
        rest = [e for e in self.rng.permutation(self.experts) if e not in out]
        return np.array(out + rest[: self.k - len(out)])


def force_routing(trace: Trace, layers: int, offload) -> callable:
    """Route every MoE call by the trace (patching the model's `route`); return a reset function.
    Each call of layer l is the trace's next step for l; with B*L tokens a call takes as many steps."""
    counters = [0] * layers
    calls = {"layer": -1}

    def route(router_logits: mx.array, k: int):
        *lead, _ = router_logits.shape
        n = math.prod(lead)
        calls["layer"] = (calls["layer"] + 1) % layers
        layer = calls["layer"]
        ids = np.stack([trace.at(layer, counters[layer] + i) for i in range(n)])
        counters[layer] += n
        return mx.array(ids.reshape(*lead, k).astype(np.uint32)), mx.full((*lead, k), 1.0 / k)

    def guess(layer: int, x: mx.array) -> mx.array:
        n = math.prod(x.shape[:-1])
        picks = []
        for i in range(n):
            true = trace.at(layer, counters[layer] + i)
            picks.append(
                true if trace.rng.random() < GUESS_ACCURACY else trace.rng.choice(trace.experts, trace.k, replace=False)
            )
        return mx.array(np.stack(picks).reshape(*x.shape[:-1], trace.k).astype(np.uint32))

    model_module.route = route
    if offload is not None:
        offload.guess = guess

    def reset():
        counters[:] = [0] * layers
        calls["layer"] = -1

    return reset


def drop_page_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def decode_run(model, prompt_len: int, tokens: int, vocab: int) -> dict:
    """Decode tok/s after a prompt (cold page cache); the offload stats of the decode part."""
    ids = np.random.default_rng(0).integers(3, vocab, prompt_len).tolist()
    steps = generate_step(ids, model, max_tokens=tokens + 1)
    next(steps)  # prefill and the first token
    if model.offload is not None:
        model.offload.stats.__init__()  # count decode only
    start = time.perf_counter()
    for _ in steps:
        pass
    mx.synchronize()
    elapsed = time.perf_counter() - start
    out = {"decode_tps": tokens / elapsed}
    if model.offload is not None:
        out.update(model.offload.stats.as_dict())
    return out


def simulate_hit_rates(kind: str, layers: int, experts: int, k: int, shares: list[float], tokens: int) -> dict:
    """Hit rate of each eviction policy on a routing trace, per cache share (no model: the caches'
    bookkeeping alone, the same LayerCache the runtime uses)."""
    out = {}
    for name, policy in POLICIES.items():
        for share in shares:
            slots = max(1, round(share * experts))
            trace = Trace(kind, layers, experts, k, seed=1)
            caches = [LayerCache(i, experts, None, slots, policy()) for i in range(layers)]
            hits = lookups = 0
            for step in range(tokens):
                for layer, cache in enumerate(caches):
                    needed = trace.at(layer, step)
                    lookups += len(needed)
                    hits += sum(cache.cached(e) for e in needed)
                    cache.touch(needed)
                    # as the runtime does: cached experts first, then groups that fit the slots
                    order = sorted((int(e) for e in needed), key=lambda e: not cache.cached(e))
                    for i in range(0, len(order), slots):
                        group = order[i : i + slots]
                        for e in group:
                            if not cache.cached(e):
                                cache.place(e, {}, keep=set(group))
            out[f"{name}@{share:.3f}"] = hits / lookups
    return out


def project(hit_rates: dict, ssd_gbs: float) -> list[dict]:
    """Projected Mixtral-8x7B 4-bit decode on 16/24/32 GB Macs: memory-bound compute of the active
    weights plus the misses' bytes from the SSD, with prefetch hiding reads behind compute (the
    faster of the two sets the pace) and without (they add)."""
    rows = []
    # (RAM GB, memory GB/s, working-set share): base M2/M3 chips at 100 GB/s, an M3 Pro at 150.
    machines = [(16, 100, 2 / 3), (24, 100, 2 / 3), (32, 150, 2 / 3)]
    for ram, bandwidth, ws in machines:
        budget = ram * 1e9 * ws
        # 8x7B sizes at 4-bit g64 (mlx_mixtral.memory.plan): 0.905 GB non-expert, 99.1 MB per expert,
        # 256 experts; KV cache 4096 tokens in float16 (0.54 GB) and the planner's overhead (0.58 GB).
        room = budget - 0.905e9 - 0.537e9 - 0.58e9
        slots = max(32, min(256, int(room // 99.1e6)))
        share = slots / 256
        nearest = min((float(key.split("@")[1]) for key in hit_rates if key.startswith("lru@")),
                      key=lambda s: abs(s - share))  # fmt: skip
        hit = hit_rates[f"lru@{nearest:.3f}"]
        misses = 64 * (1 - hit)
        compute = (0.905e9 + 64 * 99.1e6) / (bandwidth * 1e9)  # a token reads ~7.2 GB: non-expert + 64 experts
        read = misses * 99.1e6 / (ssd_gbs * 1e9)
        rows.append({"mac_gb": ram, "expert_share": share, "hit_rate": hit, "misses_per_token": misses,
                     "tps_prefetch": 1 / max(compute, read), "tps_no_prefetch": 1 / (compute + read)})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tokens", type=int, default=12, help="decode tokens per run")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--ssd-gbs", type=float, default=3.0, help="SSD read speed for the projection (GB/s)")
    args = p.parse_args()
    shape = dict(hidden=1024, ffn=3584, experts=8, top_k=2, layers=args.layers, heads=16, kv_heads=4)
    path = OUT / "model-h{hidden}-f{ffn}-e{experts}-l{layers}".format(**shape)
    if not (path / "config.json").exists():
        print(f"writing {path} ...", file=sys.stderr)
        write_random_quantized(path, **shape)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"model: {path.name}, {size / 1e9:.2f} GB of 4-bit weights", file=sys.stderr)
    full = plan(path, max_memory="1TB")
    results = {"model_bytes": size, "expert_bytes": full.expert_bytes, "runs": []}

    original_route = model_module.route
    resident = load_model(path)
    base = []
    for routing in ("model", "uniform", "locality"):
        model_module.route = original_route
        if routing != "model":
            reset = force_routing(Trace(routing, args.layers, 8, 2, seed=0), args.layers, None)
            reset()
        drop_page_cache(path)
        r = decode_run(resident, args.prompt, args.tokens, 32000)
        base.append(r["decode_tps"])
        results["runs"].append({"routing": routing, "budget": "resident", "prefetch": None, **r})
        print(f"{routing:<9} resident              decode {r['decode_tps']:6.2f} tok/s", file=sys.stderr)
    del resident
    model_module.route = original_route

    for share in ("100%", "75%", "50%", "25%"):
        for prefetch in (True, False):
            slots = full.with_expert_cache(share).layer_slots()
            model = load_offloaded(path, slots, prefetch=prefetch, cold=True)
            for i, routing in enumerate(("model", "uniform", "locality")):
                model_module.route = original_route
                model.offload.guess = model.offload.router_guess
                if routing != "model":
                    force_routing(Trace(routing, args.layers, 8, 2, seed=0), args.layers, model.offload)
                drop_page_cache(path)
                r = decode_run(model, args.prompt, args.tokens, 32000)
                r["vs_resident"] = r["decode_tps"] / base[i]
                results["runs"].append({"routing": routing, "budget": share, "prefetch": prefetch, **r})
                print(f"{routing:<9} {share:>4} prefetch={prefetch!s:<5} decode {r['decode_tps']:6.2f} tok/s "
                      f"({r['vs_resident']:.2f}x resident), hit {r['hit_rate']:.0%}, "
                      f"{r['bytes_read_per_token'] / 1e6:.0f} MB/token, stall {r['stall_ms_per_token']:.0f} ms/token, "
                      f"prefetch right {r['prefetch_accuracy']:.0%}", file=sys.stderr)  # fmt: skip
            model.offload.close()
            del model
    model_module.route = original_route

    shares = [1 / 8, 2 / 8, 3 / 8, 4 / 8, 6 / 8]
    sims = {kind: simulate_hit_rates(kind, 32, 8, 2, shares, 2000) for kind in ("uniform", "locality")}
    results["policy_hit_rates"] = sims
    print("\nhit rate by eviction policy (32 layers, 8 experts, top-2, 2000 tokens):", file=sys.stderr)
    for kind, rates in sims.items():
        for name in POLICIES:
            row = " ".join(f"{rates[f'{name}@{s:.3f}']:.1%}" for s in shares)
            print(f"  {kind:<9} {name:<5} at {'/'.join(f'{s:.0%}' for s in shares)}: {row}", file=sys.stderr)
    results["projection"] = project(sims["locality"], args.ssd_gbs)
    print(f"\nprojected Mixtral-8x7B 4-bit decode (locality trace hit rates, SSD {args.ssd_gbs} GB/s):",
          file=sys.stderr)  # fmt: skip
    for row in results["projection"]:
        print(f"  {row['mac_gb']} GB Mac: {row['expert_share']:.0%} of experts cached, hit {row['hit_rate']:.0%}, "
              f"{row['misses_per_token']:.0f} misses/token -> {row['tps_prefetch']:.2f} tok/s with prefetch, "
              f"{row['tps_no_prefetch']:.2f} without (projected)", file=sys.stderr)  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({"median_resident_tps": statistics.median(base)}))


if __name__ == "__main__":
    main()
