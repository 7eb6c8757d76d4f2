"""Which expert leaves a full layer cache: the eviction policies compared in benchmarks/offload.py.

Each policy sees every use of an expert (`touch`) and, when a slot is needed, picks the victim among
the experts the current step does not need (`victim`). All keep O(cached experts) state per layer.
"""

from __future__ import annotations

from collections.abc import Iterable


class LRU:
    """Least recently used (the expert cache of Eliseev & Mazur's mixtral-offloading)."""

    name = "lru"

    def __init__(self):
        self.last: dict[int, int] = {}

    def touch(self, expert: int, tick: int) -> None:
        self.last[expert] = tick

    def victim(self, candidates: Iterable[int]) -> int:
        return min(candidates, key=lambda e: self.last.get(e, -1))

    def forget(self, expert: int) -> None:
        self.last.pop(expert, None)


class LFU:
    """Least frequently used, with the counts halved every `half_life` uses so that a once-popular
    expert does not stay forever; ties go to the least recent."""

    name = "lfu"

    def __init__(self, half_life: int = 64):
        self.half_life = half_life
        self.count: dict[int, float] = {}
        self.last: dict[int, int] = {}
        self._uses = 0

    def touch(self, expert: int, tick: int) -> None:
        self._uses += 1
        if self._uses % self.half_life == 0:
            self.count = {e: c / 2 for e, c in self.count.items()}
        self.count[expert] = self.count.get(expert, 0.0) + 1.0
        self.last[expert] = tick

    def victim(self, candidates: Iterable[int]) -> int:
        return min(candidates, key=lambda e: (self.count.get(e, 0.0), self.last.get(e, -1)))

    def forget(self, expert: int) -> None:
        self.last.pop(expert, None)  # its count stays: frequency is a property of the expert, not the slot


class FIFO:
    """First in, first out: the baseline that ignores use."""

    name = "fifo"

    def __init__(self):
        self.since: dict[int, int] = {}

    def touch(self, expert: int, tick: int) -> None:
        self.since.setdefault(expert, tick)

    def victim(self, candidates: Iterable[int]) -> int:
        return min(candidates, key=lambda e: self.since.get(e, -1))

    def forget(self, expert: int) -> None:
        self.since.pop(expert, None)


POLICIES = {p.name: p for p in (LRU, LFU, FIFO)}
DEFAULT_POLICY = "lru"
