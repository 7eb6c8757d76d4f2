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


def _grow(buffer: mx.array | None, used: int, extra: int, like: mx.array, cap: int | None) -> mx.array:
    """A buffer with room for `extra` more positions after `used`, allocated in GROW_STEP blocks."""
    B, H, _, D = like.shape
    size = -(-(used + extra) // GROW_STEP) * GROW_STEP
    if cap is not None:
        size = min(size, cap)
    fresh = mx.zeros((B, H, size - used, D), like.dtype)
    return fresh if buffer is None or used == 0 else mx.concatenate([buffer[..., :used, :], fresh], axis=2)


class KVCache:
    """Unbounded cache: keeps every position."""

    max_size = None

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self.keys = _grow(self.keys, start, keys.shape[2], keys, None)
            self.values = _grow(self.values, start, keys.shape[2], values, None)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]  # (B, Hkv, S, Dh)

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def meta(self) -> dict[str, str]:
        return {"offset": str(self.offset)}

    @classmethod
    def from_state(cls, keys: mx.array, values: mx.array, meta: dict[str, str]) -> KVCache:
        cache = cls()
        cache.keys, cache.values, cache.offset = keys, values, int(meta["offset"])
        return cache

    def trimmable(self) -> int:
        return self.offset

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n


class RotatingKVCache:
    """Keeps the newest `max_size` positions in a ring buffer (sliding-window attention).

    Decode steps overwrite the oldest slot in place, so stored keys are out of time order;
    attention does not care because every stored key is inside the window then. A multi-token
    update returns the previous `max_size - 1` keys plus the new ones in time order, which is
    exactly what the first new query needs, and the caller masks the window per query.
    """

    def __init__(self, max_size: int):
        if max_size < 1:
            raise OptionError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._write = 0  # ring position the next decode step writes to

    @property
    def _stored(self) -> int:
        return min(self.offset, self.max_size)

    def _in_time_order(self, buffer: mx.array) -> mx.array:
        if self.offset <= self.max_size or self._write == 0:
            return buffer[..., : self._stored, :]
        return mx.concatenate([buffer[..., self._write : self._stored, :], buffer[..., : self._write, :]], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1 and self.keys is not None:
            return self._update_one(keys, values)
        keep = self.max_size - 1
        old_k, old_v = self.state if self.keys is not None else (keys[..., :0, :], values[..., :0, :])
        all_k = mx.concatenate([old_k[..., old_k.shape[2] - min(keep, old_k.shape[2]) :, :], keys], axis=2)
        all_v = mx.concatenate([old_v[..., old_v.shape[2] - min(keep, old_v.shape[2]) :, :], values], axis=2)
        self.offset += keys.shape[2]
        self.keys, self.values = all_k[..., -self.max_size :, :], all_v[..., -self.max_size :, :]
        self._write = self.keys.shape[2] % self.max_size
        return all_k, all_v  # (B, Hkv, S, Dh) in time order

    def _update_one(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        stored = self._stored
        if stored < self.max_size and stored == self.keys.shape[2]:
            self.keys = _grow(self.keys, stored, 1, keys, self.max_size)
            self.values = _grow(self.values, stored, 1, values, self.max_size)
        slot = self._write
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self.offset += 1
        self._write = (slot + 1) % self.max_size
        stored = self._stored
        return self.keys[..., :stored, :], self.values[..., :stored, :]  # (B, Hkv, S, Dh), ring order

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self._in_time_order(self.keys), self._in_time_order(self.values)

    def meta(self) -> dict[str, str]:
        return {"offset": str(self.offset), "max_size": str(self.max_size)}

    @classmethod
    def from_state(cls, keys: mx.array, values: mx.array, meta: dict[str, str]) -> RotatingKVCache:
        cache = cls(int(meta["max_size"]))
        cache.keys, cache.values, cache.offset = keys, values, int(meta["offset"])
        cache._write = keys.shape[2] % cache.max_size
        return cache

    def trimmable(self) -> int:
        # Removing n tokens is exact only if the keys the new last query needs are still here:
        # all of them while nothing has been dropped, else only what exceeds a full window.
        if self.offset <= self.max_size:
            return self.offset
        return max(0, self._stored - self.max_size + 1)

    def trim(self, n: int) -> int:
        n = min(n, self.trimmable())
        if n:
            keys, values = self.state
            self.keys, self.values = keys[..., : keys.shape[2] - n, :], values[..., : values.shape[2] - n, :]
            self.offset -= n
            self._write = self.keys.shape[2] % self.max_size
        return n


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
        arrays[f"{i}.keys"], arrays[f"{i}.values"] = layer.state
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
            caches.append(cls.from_state(arrays[f"{i}.keys"], arrays[f"{i}.values"], meta))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise CacheFileError(f"{path}: not a {what} (its layer metadata does not describe its tensors)") from None
    user = {k[len("user.") :]: v for k, v in info.items() if k.startswith("user.")}
    return caches, user
