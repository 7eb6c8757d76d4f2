"""Reading the experts the next layer will probably need while the current layer computes.

The guess is the next layer's router applied to the current layer's MoE input (Eliseev & Mazur,
"Fast Inference of Mixture-of-Experts Language Models with Offloading", arXiv 2312.17238: the hidden
state changes little from one layer to the next, so the next gate mostly picks what it will pick).
One reader thread does only file I/O into numpy buffers; the generation thread, which owns every
MLX array, copies a finished read into a slot when its layer runs. A guess that was wrong is
dropped after its layer, so a bad guess never evicts anything.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from mlx_mixtral.offload.stats import OffloadStats
from mlx_mixtral.offload.store import ExpertStore


class Prefetcher:
    def __init__(self, store: ExpertStore, stats: OffloadStats):
        self.store, self.stats = store, stats
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-mixtral-prefetch")
        self._pending: dict[tuple[int, int], Future] = {}

    def request(self, layer: int, experts) -> None:
        for e in experts:
            key = (layer, int(e))
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self.store.read, layer, int(e))
                self.stats.prefetched += 1

    def take(self, layer: int, expert: int) -> dict[str, np.ndarray] | None:
        """The prefetched parts of (layer, expert), waiting for the read if it is still running;
        None if it was not prefetched. A failed read raises its error here."""
        future = self._pending.pop((layer, expert), None)
        if future is None:
            return None
        start = time.perf_counter()
        arrays = future.result()
        self.stats.stall_s += time.perf_counter() - start
        self.stats.prefetch_used += 1
        return arrays

    def drop(self, layer: int) -> None:
        """Forget the guesses for a layer that has run; reads not started yet are cancelled."""
        for key in [k for k in self._pending if k[0] == layer]:
            self._pending.pop(key).cancel()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
