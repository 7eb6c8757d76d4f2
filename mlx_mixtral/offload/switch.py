"""The MoE expert layer of an offloaded model, and the object that runs all of them.

Per layer call (shapes: B batch, L length, D hidden, K experts per token, N = B*L*K pairs, E experts):
  1. one host sync for the routed expert ids (and, with prefetch, the guess for the next layer);
  2. the distinct experts needed are looked up in the layer's slots; misses come from the prefetch
     thread when it guessed them, else are read now (the stall);
  3. when they all fit in the slots, ids become slot ids and the resident SwitchGLU code runs on
     the slots; when they do not (a long prompt touching every expert of a layer with few slots),
     the experts are taken in groups that fit, each group computing only its own (token, slot)
     pairs, and the pairs are put back in place.
A fully resident model never gets here: its layers are plain SwitchGLUs with no host syncs.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_mixtral.experts import SwitchGLU, route
from mlx_mixtral.offload.cache import LayerCache
from mlx_mixtral.offload.prefetch import Prefetcher
from mlx_mixtral.offload.stats import OffloadStats
from mlx_mixtral.offload.store import ExpertStore


class OffloadedSwitchGLU(nn.Module):
    """Stands where a layer's `switch_mlp` stands; its parameters are the layer's expert slots."""

    def __init__(self, slots: SwitchGLU, layer: int, offload: ExpertOffload):
        super().__init__()
        self.slots = slots
        self.layer = layer
        self.offload = offload  # a plain object, not a child module

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        return self.offload.run(self.layer, x, indices, weights)


class ExpertOffload:
    """Every layer's expert cache, the store they read from, the prefetcher and the statistics."""

    def __init__(self, store: ExpertStore, caches: list[LayerCache], routers: list[nn.Module], *, prefetch: bool,
                 top_k: int):  # fmt: skip
        self.store, self.caches, self.routers, self.top_k = store, caches, routers, top_k
        self.stats = OffloadStats()
        self.prefetcher = Prefetcher(store, self.stats) if prefetch else None
        self.guess = self.router_guess  # replaceable (benchmarks drive it from a routing trace)

    def router_guess(self, layer: int, x: mx.array) -> mx.array:
        """The experts `layer` will probably pick for the tokens of x (the previous layer's MoE
        input): its own router applied to x. (B, L, K) ids, lazy."""
        return route(self.routers[layer](x), self.top_k)[0]

    def run(self, layer: int, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        cache = self.caches[layer]
        guess = None
        if self.prefetcher is not None and layer + 1 < len(self.caches):
            guess = self.guess(layer + 1, x)  # (B, L, K) for the next layer
        mx.eval(indices, *([] if guess is None else [guess]))  # the offload path's one host sync per layer
        ids = np.array(indices).reshape(-1)  # (N,)
        if layer == 0:
            self.stats.tokens += ids.size // indices.shape[-1]
        needed = np.unique(ids)
        self.stats.lookups += needed.size
        self.stats.hits += int(sum(cache.cached(e) for e in needed))
        cache.touch(needed)
        if guess is not None:
            upcoming = self.caches[layer + 1]
            wanted = [e for e in np.unique(np.array(guess)) if not upcoming.cached(e)]
            self.prefetcher.request(layer + 1, wanted)
            self.stats.bytes_read += len(wanted) * self.store.expert_bytes(layer + 1)
        # Cached experts first: the first group then evicts nothing that a later group needs.
        order = sorted(needed.tolist(), key=lambda e: not cache.cached(e))
        groups = [order[i : i + cache.num_slots] for i in range(0, len(order), cache.num_slots)]
        if len(groups) == 1:
            self._fill(cache, groups[0])
            out = cache.slots(x, cache.slot_table()[indices], weights)  # (B, L, D)
        else:
            out = self._in_groups(cache, groups, ids, x, indices, weights)
        if self.prefetcher is not None:
            self.prefetcher.drop(layer)
        return out

    def _fill(self, cache: LayerCache, group: list[int]) -> None:
        keep = set(group)
        for e in group:
            if cache.cached(e):
                continue
            arrays = self.prefetcher.take(cache.layer, e) if self.prefetcher is not None else None
            if arrays is None:
                start = time.perf_counter()
                arrays = self.store.read(cache.layer, e)
                self.stats.stall_s += time.perf_counter() - start
                self.stats.bytes_read += self.store.expert_bytes(cache.layer)
            cache.place(e, arrays, keep)
            self.store.release(arrays)

    def _in_groups(self, cache: LayerCache, groups: list[list[int]], ids: np.ndarray, x: mx.array,
                   indices: mx.array, weights: mx.array) -> mx.array:  # fmt: skip
        k, d = indices.shape[-1], x.shape[-1]
        flat_x = x.reshape(-1, d)  # (B*L, D)
        outputs, positions = [], []
        for group in groups:
            self._fill(cache, group)
            pairs = np.flatnonzero(np.isin(ids, group))  # (P,) pairs of this group's experts
            slot_ids = cache.slot_of[ids[pairs]]
            by_slot = np.argsort(slot_ids, kind="stable")
            pairs, slot_ids = pairs[by_slot], slot_ids[by_slot]
            rows = flat_x[mx.array(pairs // k)][:, None, :]  # (P, 1, D)
            y = cache.slots.expert_outputs(rows, mx.array(slot_ids), sorted_indices=True).squeeze(1)  # (P, D)
            mx.eval(y)  # before the next group overwrites slots this one reads
            outputs.append(y)
            positions.append(pairs)
        back = np.argsort(np.concatenate(positions))
        y = mx.concatenate(outputs)[mx.array(back)].reshape(*indices.shape, d)  # (B, L, K, D)
        return (y * weights[..., None]).sum(axis=-2).astype(x.dtype)  # (B, L, D)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.store.close()
