"""What offloading costs, counted as it runs: hit rate, bytes read, stall time, prefetch accuracy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OffloadStats:
    tokens: int = 0  # tokens through the model (prompt and generated)
    lookups: int = 0  # (layer, expert) uses: each distinct expert a layer call needs counts once
    hits: int = 0  # of those, already in the layer's cache
    bytes_read: int = 0  # expert bytes read from the model's files (misses and prefetches)
    stall_s: float = 0.0  # time the generation thread waited for expert reads
    prefetched: int = 0  # experts the prefetcher read ahead
    prefetch_used: int = 0  # of those, needed when their layer ran

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    def as_dict(self) -> dict:
        per = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "hit_rate": self.hit_rate,
            "bytes_read_per_token": self.bytes_read / per,
            "stall_ms_per_token": 1e3 * self.stall_s / per,
            "prefetch_accuracy": self.prefetch_accuracy,
            "lookups": self.lookups,
            "bytes_read": self.bytes_read,
            "prefetched": self.prefetched,
        }

    def line(self) -> str:
        d = self.as_dict()
        prefetch = f", prefetch right {d['prefetch_accuracy']:.0%}" if self.prefetched else ""
        return (
            f"experts: hit rate {d['hit_rate']:.0%}, {d['bytes_read_per_token'] / 1e6:.1f} MB read per token, "
            f"stall {d['stall_ms_per_token']:.1f} ms per token{prefetch}"
        )
