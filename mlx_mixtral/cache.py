"""Per-layer key/value caches and prompt-cache files.

Shapes: B batch, Hkv key/value heads, L new tokens, S stored tokens, Dh head dim.
Keys and values arrive after RoPE as (B, Hkv, L, Dh).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import mlx.core as mx

from mlx_mixtral.errors import CacheFileError, OptionError

# Caches grow in blocks so a decode step writes in place instead of concatenating.
GROW_STEP = 256


@runtime_checkable
class Cache(Protocol):
    offset: int  # tokens seen so far = absolute position of the next token
    max_size: int | None  # keys kept at most (None: all)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store the new (B, Hkv, L, Dh) keys/values; return everything attention should see."""
        ...

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        """The stored keys and values in time order, (B, Hkv, S, Dh) each."""
        ...

    def meta(self) -> dict[str, str]:
        """What besides `state` is needed to rebuild this cache."""
        ...

    def trimmable(self) -> int:
        """How many of the newest tokens `trim` can remove exactly."""
        ...

    def trim(self, n: int) -> int:
        """Forget the newest `min(n, trimmable())` tokens; return how many were removed."""
        ...


# Stored keys (or values) are one array, or with a quantized cache the (packed, scales, biases)
# triple of mx.quantize; every part has the time axis at 2, so the helpers below treat both alike.
Stored = mx.array | tuple[mx.array, ...]
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


def _map(fn, *parts: Stored) -> Stored:
    if isinstance(parts[0], tuple):
        return tuple(fn(*p) for p in zip(*parts))
    return fn(*parts)


def _length(stored: Stored) -> int:
    return (stored[0] if isinstance(stored, tuple) else stored).shape[2]


def _cut(stored: Stored, start: int, end: int) -> Stored:
    return _map(lambda a: a[..., start:end, :], stored)


def _join(*stored: Stored) -> Stored:
    return _map(lambda *a: mx.concatenate(a, axis=2), *stored)


def _grow(buffer: Stored | None, used: int, extra: int, like: Stored, cap: int | None) -> Stored:
    """A buffer with room for `extra` more positions after `used`, allocated in GROW_STEP blocks."""
    size = -(-(used + extra) // GROW_STEP) * GROW_STEP
    if cap is not None:
        size = min(size, cap)

    def grow(old: mx.array | None, new: mx.array) -> mx.array:
        B, H, _, D = new.shape
        fresh = mx.zeros((B, H, size - used, D), new.dtype)
        return fresh if old is None or used == 0 else mx.concatenate([old[..., :used, :], fresh], axis=2)

    if buffer is None:
        return _map(lambda n: grow(None, n), like)
    return _map(grow, buffer, like)


def _write(buffer: Stored, start: int, new: Stored) -> None:
    end = start + _length(new)
    parts = zip(buffer, new) if isinstance(buffer, tuple) else [(buffer, new)]
    for b, n in parts:
        b[..., start:end, :] = n


def check_kv_quantization(bits: int | None, group_size: int, head_dim: int | None = None) -> None:
    if bits is None:
        return
    if bits not in KV_BITS:
        raise OptionError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (or None), got {bits}", "kv_bits")
    if group_size not in KV_GROUP_SIZES:
        raise OptionError(
            f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {group_size}", "kv_group_size"
        )
    if head_dim is not None and head_dim % group_size:
        raise OptionError(
            f"kv_group_size {group_size} does not divide the model's head_dim {head_dim}; use a smaller group",
            "kv_group_size",
        )


class _Quantizing:
    """What a cache that stores its keys/values quantized (kv_bits) adds: attention reads them
    with quantized matmuls (model.quantized_attention) instead of dequantizing the whole cache."""

    bits: int | None = None
    group_size: int = 64

    def _store_form(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        if self.bits is None:
            return keys, values
        return (
            tuple(mx.quantize(keys, group_size=self.group_size, bits=self.bits)),
            tuple(mx.quantize(values, group_size=self.group_size, bits=self.bits)),
        )

    def _quant_meta(self) -> dict[str, str]:
        return {} if self.bits is None else {"bits": str(self.bits), "group_size": str(self.group_size)}

    def _set_quantization(self, bits: int | None, group_size: int) -> None:
        check_kv_quantization(bits, group_size)
        self.bits, self.group_size = bits, group_size


class KVCache(_Quantizing):
    """Unbounded cache: keeps every position (quantized to `bits` when given)."""

    max_size = None

    def __init__(self, bits: int | None = None, group_size: int = 64):
        self._set_quantization(bits, group_size)
        self.keys: Stored | None = None
        self.values: Stored | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        keys, values = self._store_form(keys, values)
        start, end = self.offset, self.offset + _length(keys)
        if self.keys is None or end > _length(self.keys):
            self.keys = _grow(self.keys, start, end - start, keys, None)
            self.values = _grow(self.values, start, end - start, values, None)
        _write(self.keys, start, keys)
        _write(self.values, start, values)
        self.offset = end
        return _cut(self.keys, 0, end), _cut(self.values, 0, end)  # (B, Hkv, S, Dh) each part

    @property
    def state(self) -> tuple[Stored, Stored]:
        return _cut(self.keys, 0, self.offset), _cut(self.values, 0, self.offset)

    def meta(self) -> dict[str, str]:
        return {"offset": str(self.offset), **self._quant_meta()}

    @classmethod
    def from_state(cls, keys: Stored, values: Stored, meta: dict[str, str]) -> KVCache:
        cache = cls(_bits(meta), int(meta.get("group_size", 64)))
        cache.keys, cache.values, cache.offset = keys, values, int(meta["offset"])
        return cache

    def prefix(self, n: int) -> KVCache:
        """A new cache holding this one's first n positions."""
        keys, values = self.state
        return KVCache.from_state(_cut(keys, 0, n), _cut(values, 0, n), {**self.meta(), "offset": str(n)})

    def trimmable(self) -> int:
        return self.offset

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n


class RotatingKVCache(_Quantizing):
    """Keeps the newest `max_size` positions (sliding-window attention).

    Decode steps overwrite the oldest slot of a full ring buffer in place, so stored keys are out
    of time order; attention does not care because every stored key is inside the window then.
    A multi-token update returns, and keeps in time order, the previous `max_size - 1` keys plus
    the new L ones: exactly what its first query needs (the caller masks the window per query),
    and what lets `trim` take back all L of them (speculative decoding's rejected drafts, a chat
    turn's reused prefix). The next decode step folds that back into a ring of `max_size`.
    """

    def __init__(self, max_size: int, bits: int | None = None, group_size: int = 64):
        if max_size < 1:
            raise OptionError(f"max_size must be >= 1, got {max_size}")
        self._set_quantization(bits, group_size)
        self.max_size = max_size
        self.keys: Stored | None = None
        self.values: Stored | None = None
        self.offset = 0
        self._held = 0  # positions in the buffer
        self._ring: int | None = None  # a full ring: the slot the next decode step overwrites; None: time order

    def _in_time_order(self, buffer: Stored) -> Stored:
        if not self._ring:  # None (time order) or 0 (the ring starts at slot 0)
            return _cut(buffer, 0, self._held)
        return _join(_cut(buffer, self._ring, self._held), _cut(buffer, 0, self._ring))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        keys, values = self._store_form(keys, values)
        new = _length(keys)
        if new == 1 and self.keys is not None:
            return self._update_one(keys, values)
        if self.keys is not None:
            old_k, old_v = self.state
            kept = min(self.max_size - 1, self._held)
            keys = _join(_cut(old_k, self._held - kept, self._held), keys)
            values = _join(_cut(old_v, self._held - kept, self._held), values)
        self.offset += new
        self.keys, self.values = keys, values
        self._held, self._ring = _length(keys), None
        return keys, values  # (B, Hkv, S, Dh) each part, in time order

    def _update_one(self, keys: Stored, values: Stored) -> tuple[Stored, Stored]:
        self.offset += 1
        if self._ring is not None:
            slot = self._ring
            _write(self.keys, slot, keys)
            _write(self.values, slot, values)
            self._ring = (slot + 1) % self.max_size
            return self.keys, self.values  # (B, Hkv, max_size, Dh), ring order
        if self._held >= self.max_size:  # time order, full or over: the newest max_size - 1 and this one
            held = self._held
            self.keys = _join(_cut(self.keys, held - self.max_size + 1, held), keys)
            self.values = _join(_cut(self.values, held - self.max_size + 1, held), values)
            self._held, self._ring = self.max_size, 0
            return self.keys, self.values
        if self._held == _length(self.keys):
            self.keys = _grow(self.keys, self._held, 1, keys, self.max_size)
            self.values = _grow(self.values, self._held, 1, values, self.max_size)
        _write(self.keys, self._held, keys)
        _write(self.values, self._held, values)
        self._held += 1
        if self._held == self.max_size:
            self._ring = 0
        return _cut(self.keys, 0, self._held), _cut(self.values, 0, self._held)  # (B, Hkv, S, Dh)

    @property
    def state(self) -> tuple[Stored, Stored]:
        return self._in_time_order(self.keys), self._in_time_order(self.values)

    def meta(self) -> dict[str, str]:
        return {"offset": str(self.offset), "max_size": str(self.max_size), **self._quant_meta()}

    @classmethod
    def from_state(cls, keys: Stored, values: Stored, meta: dict[str, str]) -> RotatingKVCache:
        cache = cls(int(meta["max_size"]), _bits(meta), int(meta.get("group_size", 64)))
        cache.keys, cache.values, cache.offset = keys, values, int(meta["offset"])
        cache._held = _length(keys)
        return cache

    def trimmable(self) -> int:
        # Removing n tokens is exact only if the keys the new last query needs are still here:
        # all of them while nothing has been dropped, else only what exceeds a full window.
        if self.offset <= self.max_size:
            return self.offset
        return max(0, self._held - self.max_size + 1)

    def trim(self, n: int) -> int:
        n = min(n, self.trimmable())
        if n:
            keys, values = self.state
            self._held -= n
            self.keys, self.values = _cut(keys, 0, self._held), _cut(values, 0, self._held)
            self._ring = None
            self.offset -= n
        return n


def kv_dims(layer: Cache) -> tuple[int, int]:
    """(key/value heads, head dim) of what a cache layer stores, quantized or not."""
    keys = layer.state[0]
    if isinstance(keys, tuple):  # packed uint32 words of 32 / bits elements each
        return keys[0].shape[1], keys[0].shape[3] * 32 // layer.bits
    return keys.shape[1], keys.shape[3]


def _bits(meta: dict[str, str]) -> int | None:
    return int(meta["bits"]) if "bits" in meta else None


_CACHE_TYPES = {cls.__name__: cls for cls in (KVCache, RotatingKVCache)}


def save_prompt_cache(path: str | Path, cache: list[Cache], metadata: dict[str, str] | None = None) -> None:
    """Write every layer's keys/values and what rebuilds them into one safetensors file, named
    exactly `path` (mx.save_safetensors alone would add ".safetensors" to a name without it). The
    file is written beside its destination and renamed onto it, so a failed save leaves an older
    file of that name as it was."""
    path = Path(path)
    arrays: dict[str, mx.array] = {}
    layers = []
    for i, layer in enumerate(cache):
        if layer.offset == 0:
            raise CacheFileError(f"layer {i} cache is empty; nothing to save")
        for name, stored in zip(("keys", "values"), layer.state):
            if isinstance(stored, tuple):  # a quantized cache: packed, scales, biases
                arrays.update({f"{i}.{name}.{j}": part for j, part in enumerate(stored)})
            else:
                arrays[f"{i}.{name}"] = stored
        layers.append({"type": type(layer).__name__, **layer.meta()})
    info = {"mlx_mixtral.cache": json.dumps(layers)}
    info.update({f"user.{k}": str(v) for k, v in (metadata or {}).items()})
    folder = path.parent
    if path.is_dir():
        raise CacheFileError(f"{path}: is a directory")
    if not folder.is_dir():
        raise CacheFileError(f"{folder}: {'not a directory' if folder.exists() else 'no such directory'}")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
        with os.fdopen(fd, "wb") as f:
            mx.save_safetensors(f, arrays, metadata=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; a saved file gets the usual mode
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:  # the disk, or mlx's writer, failed
        raise CacheFileError(f"{path}: {getattr(e, 'strerror', None) or ' '.join(str(e).split())}") from None
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _stored_parts(arrays: dict[str, mx.array], name: str, quantized: bool) -> Stored:
    return tuple(arrays[f"{name}.{j}"] for j in range(3)) if quantized else arrays[name]


def load_prompt_cache(path: str | Path, what: str = "prompt cache") -> tuple[list[Cache], dict[str, str]]:
    """Read a file written by `save_prompt_cache`: (per-layer caches, user metadata). `what` names
    the kind of file in error messages ("saved chat" for a chat session)."""
    path = Path(path)
    if not path.exists():
        raise CacheFileError(f"{path}: no such file")
    if path.is_dir():
        raise CacheFileError(f"{path}: is a directory, not a {what}")
    try:
        arrays, info = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception:  # mlx raises bare RuntimeError/ValueError with long messages
        raise CacheFileError(f"{path}: not a {what} (not a safetensors file)") from None
    if "mlx_mixtral.cache" not in info:
        raise CacheFileError(f"{path}: not a {what} (no 'mlx_mixtral.cache' metadata)")
    caches: list[Cache] = []
    try:
        for i, meta in enumerate(json.loads(info["mlx_mixtral.cache"])):
            cls = _CACHE_TYPES[meta.pop("type")]
            parts = [_stored_parts(arrays, f"{i}.{name}", "bits" in meta) for name in ("keys", "values")]
            caches.append(cls.from_state(*parts, meta))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise CacheFileError(f"{path}: not a {what} (its layer metadata does not describe its tensors)") from None
    user = {k[len("user.") :]: v for k, v in info.items() if k.startswith("user.")}
    return caches, user
