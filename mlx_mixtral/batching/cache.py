"""A key/value cache for a batch of sequences of different lengths.

Shapes: B rows (sequences), Hkv key/value heads, L new tokens per row, S slots, Dh head dim.

Rows share one buffer of S slots and are left-padded: row b's keys fill slots left[b]..S-1, its
newest key always in the last slot. Each row keeps its own absolute position for RoPE, so a row
that joins a batch whose other rows are much longer computes exactly what it would alone: RoPE
makes attention scores depend on position differences only, and the distance between two slots
is the same in every row. The padding slots are masked out; the causal and sliding-window masks
are the same for every row in slot terms.

Rows join (`extend`, from a one-sequence cache whose prompt was prefilled alone), leave (`keep`),
and leave with their keys (`row`: a one-sequence cache again, for the server's prefix cache).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_mixtral.cache import (
    Cache,
    KVCache,
    RotatingKVCache,
    Stored,
    _cut,
    _grow,
    _length,
    _map,
    _Quantizing,
    _write,
)


def _pad_left(stored: Stored, n: int) -> Stored:
    """`n` zero slots before the first one (every part of a quantized triple alike)."""
    if n == 0:
        return stored

    def pad(a: mx.array) -> mx.array:
        B, H, _, D = a.shape
        return mx.concatenate([mx.zeros((B, H, n, D), a.dtype), a], axis=2)

    return _map(pad, stored)


def _no_slots(like: Stored, rows: int) -> Stored:
    """Zero-width storage shaped like `like` for `rows` rows."""
    return _map(lambda a: mx.zeros((rows, a.shape[1], 0, a.shape[3]), a.dtype), like)


def _stack_rows(*parts: mx.array) -> mx.array:
    return mx.concatenate(parts, axis=0)


class BatchKVCache(_Quantizing):
    """One layer's keys/values for B sequences (see the module docstring). `max_size` bounds what a
    row's queries may see (a sliding window of that many positions, as `RotatingKVCache` keeps):
    slots older than that are dropped when the buffer grows, so memory stays bounded too."""

    def __init__(self, max_size: int | None = None, bits: int | None = None, group_size: int = 64):
        self._set_quantization(bits, group_size)
        self.max_size = max_size
        self.keys: Stored | None = None  # (B, Hkv, capacity, Dh); slots 0..used-1 hold data
        self.values: Stored | None = None
        self.used = 0
        self.left: list[int] = []  # (B,) padding slots at the start of each row
        self.positions: list[int] = []  # (B,) each row's next absolute position (host-side: no syncs)

    @classmethod
    def like(cls, layer: Cache) -> BatchKVCache:
        """An empty batch layer for rows of caches like `layer`: its window and KV quantization."""
        bits, group_size = (layer.bits, layer.group_size) if isinstance(layer, _Quantizing) else (None, 64)
        return cls(layer.max_size, bits, group_size)

    @property
    def offset(self) -> int:
        """Slots in use: the batch's common length, padding included."""
        return self.used

    @property
    def size(self) -> int:
        return len(self.left)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        keys, values = self._store_form(keys, values)
        new = _length(keys)
        if self.keys is None or self.used + new > _length(self.keys):
            self._drop_unseen()
            self.keys = _grow(self.keys, self.used, new, keys, None)
            self.values = _grow(self.values, self.used, new, values, None)
        _write(self.keys, self.used, keys)
        _write(self.values, self.used, values)
        self.used += new
        self.positions = [p + new for p in self.positions]
        return _cut(self.keys, 0, self.used), _cut(self.values, 0, self.used)  # (B, Hkv, S, Dh) each part

    def _drop_unseen(self) -> None:
        """Forget slots that no query can see any more: with a window of W, the next query needs
        the newest W - 1 keys besides its own."""
        if self.max_size is None or self.keys is None or self.used <= self.max_size - 1:
            return
        drop = self.used - (self.max_size - 1)
        self._cut_front(drop)

    def _cut_front(self, n: int) -> None:
        if n <= 0:
            return
        self.keys, self.values = _cut(self.keys, n, self.used), _cut(self.values, n, self.used)
        self.used -= n
        self.left = [max(0, pad - n) for pad in self.left]

    def rope_offsets(self) -> mx.array:
        """(B,) the position each row's next token has: RoPE's per-row offset."""
        return mx.array(self.positions, mx.int32)

    def mask(self, base: mx.array | str | None, length: int) -> mx.array | str | None:
        """The attention mask for `length` new queries per row, given `base`, the slot-wise causal
        (and window) mask every row shares (what `attention_mask` gives for one sequence): the
        padding slots of each row are taken out. Without padding the base mask serves as is."""
        if not any(self.left):
            return base
        S = self.used
        real = mx.arange(S)[None, :] >= mx.array(self.left)[:, None]  # (B, S)
        if base is None:
            allowed = real[:, None, None, :]  # (B, 1, 1, S)
        else:
            if isinstance(base, str):  # "causal": query i sits in slot S - length + i
                base = mx.arange(S)[None, :] <= mx.arange(S - length, S)[:, None]  # (L, S)
            allowed = base[None, None] & real[:, None, None, :]  # (B, 1, L, S)
        return allowed

    # Joining and leaving: done between forward passes, on lazy arrays (no host syncs).

    def extend(self, row: Cache) -> None:
        """Add a one-sequence cache (`row`, batch 1) as the last row."""
        n = 0 if row.offset == 0 else _length(row.state[0])
        if n == 0 and self.keys is None:  # nothing stored in any row yet (one-token prompts)
            self.left.append(0)
            self.positions.append(row.offset)
            return
        keys, values = row.state if n else (_no_slots(self.keys, 1), _no_slots(self.values, 1))
        if self.keys is None:
            self.keys, self.values = _no_slots(keys, self.size), _no_slots(values, self.size)
        old_k, old_v = _cut(self.keys, 0, self.used), _cut(self.values, 0, self.used)
        if n > self.used:  # the newcomer is longer: everyone else gets more padding
            old_k, old_v = _pad_left(old_k, n - self.used), _pad_left(old_v, n - self.used)
            self.left = [pad + n - self.used for pad in self.left]
            self.used = n
        pad = self.used - n
        self.keys = _map(_stack_rows, old_k, _pad_left(keys, pad))  # (B + 1, Hkv, S, Dh)
        self.values = _map(_stack_rows, old_v, _pad_left(values, pad))
        self.left.append(pad)
        self.positions.append(row.offset)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        if not rows:
            self.keys = self.values = None
            self.used, self.left, self.positions = 0, [], []
            return
        index = mx.array(rows, mx.int32)
        self.keys = _map(lambda a: a[index], _cut(self.keys, 0, self.used))
        self.values = _map(lambda a: a[index], _cut(self.values, 0, self.used))
        self.left = [self.left[i] for i in rows]
        self.positions = [self.positions[i] for i in rows]
        self._cut_front(min(self.left))  # padding every row has is no longer needed

    def row(self, i: int) -> Cache:
        """Row i as a one-sequence cache (a copy: the batch keeps its own)."""
        meta = {"offset": str(self.positions[i]), **self._quant_meta()}
        keys = _map(lambda a: a[i : i + 1], _cut(self.keys, self.left[i], self.used))
        values = _map(lambda a: a[i : i + 1], _cut(self.values, self.left[i], self.used))
        if self.max_size is None:
            return KVCache.from_state(keys, values, meta)
        return RotatingKVCache.from_state(keys, values, {**meta, "max_size": str(self.max_size)})

    # The rest of the Cache protocol: a batch is not trimmed or saved as a whole.

    @property
    def state(self) -> tuple[Stored, Stored]:
        return _cut(self.keys, 0, self.used), _cut(self.values, 0, self.used)

    def meta(self) -> dict[str, str]:
        return {"offset": str(self.used), **self._quant_meta()}

    def trimmable(self) -> int:
        return 0

    def trim(self, n: int) -> int:
        return 0
