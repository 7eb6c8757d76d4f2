"""How much memory this machine gives a model, and sizes written by people ("12GB").

On a Mac the GPU may wire only its recommended working set (about 2/3 of RAM on 16-32 GB Macs and
3/4 above; `sudo sysctl iogpu.wired_limit_mb=N` raises it), read from `mx.device_info(mx.gpu)`; the
default device may be the CPU, so the GPU is named explicitly. Elsewhere the budget is the memory
available now (MemAvailable), since nothing is wired.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_mixtral.errors import OptionError

_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
WIRED_LIMIT_ADVICE = "sudo sysctl iogpu.wired_limit_mb=N raises the GPU's limit"


def parse_bytes(size: str | int, what: str = "size") -> int:
    """Bytes in "500MB", "12GB", "1.5GiB" or a plain number (decimal units as in transformers'
    max_shard_size, binary ones with an `i`). OptionError names `what` and the value."""
    bad = OptionError(f"invalid {what} {size!r} (expected e.g. '500MB', '12GB' or a number of bytes)", option=what)
    if isinstance(size, bool):
        raise bad
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if m is None or float(m[1]) <= 0:
        raise bad
    return int(float(m[1]) * _UNITS[(m[2] or "").upper()])


def gb(n: int) -> str:
    """Bytes for messages in decimal units: '26.3 GB', '12.5 MB' below a gigabyte, '300 KB' below a megabyte."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if abs(n) >= 1e6 else f"{n / 1e3:.0f} KB"


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # where the figure comes from, for the plan's line

    @classmethod
    def of_machine(cls, max_memory: str | int | None = None) -> Budget:
        """`max_memory` if given, else the Metal working set, else the memory available now."""
        if max_memory is not None:
            return cls(parse_bytes(max_memory, "max_memory"), "--max-memory")
        working_set = gpu_working_set()
        if working_set is not None:
            return cls(working_set, "the GPU's recommended working set")
        available = available_memory()
        if available is not None:
            return cls(available, "memory available now")
        return cls(physical_memory(), "physical memory")


def gpu_working_set() -> int | None:
    """Bytes Metal recommends the GPU keep resident (its working set); None without a Metal GPU.
    Read from the GPU's info, not the default device's: with the CPU as default device on a Mac,
    `mx.device_info()` describes the CPU, which has no working set."""
    if not mx.metal.is_available():
        return None
    size = mx.device_info(mx.gpu).get("max_recommended_working_set_size")
    return None if size is None else int(size)


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> int | None:
    """Memory available now (Linux's MemAvailable); None where the system does not say."""
    return _meminfo("MemAvailable")


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration, ValueError):
        return None


def wire_model_memory(model: object, extra: int = 0) -> None:
    """On Apple GPUs, wire as much memory as the model's arrays (plus `extra` for the KV cache and
    headroom for activations), not the whole working set, while this model lives; restore the old
    limit after."""
    ceiling = gpu_working_set()
    if ceiling is None:
        return
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    limit = min(ceiling, int(weights_bytes * 1.1) + extra + (1 << 30))
    previous = mx.set_wired_limit(limit)
    weakref.finalize(model, mx.set_wired_limit, previous)
