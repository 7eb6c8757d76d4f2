"""What `mlx-mixtral doctor` reports, as small JSON-able dicts: this machine, MLX, memory, a model
directory's weights, disk speed and memory fit, and the fused Metal kernels' probe. Nothing prints.

A user pastes `mlx-mixtral doctor --json` into a bug report; `report()` builds that document, whose
shape cli/doctor_schema.json pins down.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_mixtral.errors import MixtralError
from mlx_mixtral.memory.budget import available_memory, gpu_working_set, physical_memory
from mlx_mixtral.memory.plan import plan

FORMAT = 1  # of the document; bumped when a field changes meaning or goes away
READ_CHUNK = 16 << 20  # large reads, as the loader's mmap faults in whole runs of pages
FASTER_THAN_DISKS = 15e9  # bytes/s: no SSD of a Mac reads this fast, the page cache does


def backend() -> str:
    """The backend MLX computes on by default here: metal, cuda or cpu."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "cpu"


def system() -> dict:
    from mlx_mixtral.bench.timing import device_name
    from mlx_mixtral.metal.decisions import package_version

    gpu = mx.device_info(mx.gpu) if mx.metal.is_available() else {}
    cpu = mx.device_info(mx.cpu)
    mac = platform.mac_ver()[0]
    return {
        "mlx_mixtral": package_version(),
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "macos": mac or None,
        },
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "mlx": {
            "version": mx.__version__,
            "backend": backend(),
            "default_device": str(mx.default_device()),
            "metal_available": mx.metal.is_available(),
        },
        "device": {
            "name": device_name(),
            "architecture": str(gpu.get("architecture") or cpu.get("architecture") or platform.machine()),
        },
    }


def _sysctl(name: str) -> int | None:
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
        return int(out)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def memory() -> dict:
    """RAM, what is free (Linux), and on a Mac the GPU working set, MLX's wired limit (0: none; the
    loader sets it to a model's size while the model lives) and the system's iogpu.wired_limit_mb
    (0: macOS's default, about 2/3 of RAM up to 32 GB and 3/4 above)."""
    total = physical_memory()
    available = None if mx.metal.is_available() else available_memory()  # unified memory: no such count
    wired = None
    if mx.metal.is_available():
        wired = mx.set_wired_limit(0)  # returns the limit it replaces: read it, then put it back
        mx.set_wired_limit(wired)
    gpu = mx.device_info(mx.gpu) if mx.metal.is_available() else {}
    return {
        "total_bytes": int(total),
        "available_bytes": available,
        "gpu_working_set_bytes": gpu_working_set(),
        "gpu_max_buffer_bytes": gpu.get("max_buffer_length"),
        "mlx_wired_limit_bytes": wired,
        "system_wired_limit_mb": _sysctl("iogpu.wired_limit_mb"),
    }


def local_model_dir(model: str) -> Path | None:
    """A local directory, or a hub id already in the local hub cache; None otherwise (the doctor
    never downloads a model)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a hub id, or no hub cache: not found either way
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def memory_fit(model_dir: Path) -> dict:
    """What the memory planner decides for this model on this machine (mlx_mixtral.memory.plan:
    from config.json and the safetensors headers, nothing read)."""
    p = plan(model_dir)
    return {
        "decision": p.decision,
        "weight_bytes": p.weight_bytes,
        "non_expert_bytes": p.non_expert_bytes,
        "experts_resident": p.experts_resident,
        "num_experts": p.num_experts,
        "kv_bytes": p.kv_bytes,
        "context": p.context,
        "overhead_bytes": p.overhead,
        "budget_bytes": p.budget.bytes,
        "budget": p.budget.source,
        "line": p.line(),
    }


def disk_read(model_dir: Path, nbytes: int = 256 << 20, clock=time.perf_counter) -> dict:
    """Read up to `nbytes` of the model's largest weight file in large reads and time it. The page
    cache is kept out where the OS allows: on Linux the range is evicted first (posix_fadvise
    DONTNEED), on macOS read with F_NOCACHE (which does not evict what is already cached)."""
    files = sorted(model_dir.glob("*.safetensors"), key=lambda p: p.stat().st_size, reverse=True)
    if not files:
        return {"error": f"{model_dir}: no safetensors files to read"}
    path = files[0]
    want = min(nbytes, path.stat().st_size)
    buffer = memoryview(bytearray(min(READ_CHUNK, max(want, 1))))
    with open(path, "rb", buffering=0) as f:
        cache = "not controlled"
        if sys.platform == "darwin":
            import fcntl

            fcntl.fcntl(f.fileno(), fcntl.F_NOCACHE, 1)
            cache = "not filled (F_NOCACHE)"
        elif hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, want, os.POSIX_FADV_DONTNEED)
            cache = "evicted first (posix_fadvise)"
        done, start = 0, clock()
        while done < want:
            n = f.readinto(buffer[: min(len(buffer), want - done)])
            if not n:
                break
            done += n
        seconds = max(clock() - start, 1e-9)
    speed = done / seconds
    return {
        "file": str(path),
        "bytes": done,
        "seconds": seconds,
        "gb_per_s": speed / 1e9,
        "page_cache": cache,
        # Evicted pages another process maps stay cached, F_NOCACHE serves what was cached before,
        # and nothing but the cache reads faster than any SSD.
        "may_be_cached": cache != "evicted first (posix_fadvise)" or speed > FASTER_THAN_DISKS,
    }


def model_section(model: str, read_bytes: int = 256 << 20) -> dict:
    """The model's directory, weights, memory fit and disk speed; a problem is reported, not raised."""
    model_dir = local_model_dir(model)
    out: dict[str, Any] = {"argument": model, "path": None if model_dir is None else str(model_dir), "error": None}
    if model_dir is None:
        out["error"] = f"{model}: not a local directory, nor in the local hub cache (the doctor downloads nothing)"
        return out
    try:
        out["memory_plan"] = memory_fit(model_dir)
    except MixtralError as e:
        out["error"] = " ".join(str(e).split())
    try:
        out["disk_read"] = disk_read(model_dir, read_bytes)
    except OSError as e:
        out["disk_read"] = {"error": f"{model_dir}: cannot read ({e.strerror})"}
    return out


def kernels_section(model_dir: Path | None = None, tuner: Any = None) -> dict:
    """The fused kernels' probe, fresh (no decision cache): on each distinct expert geometry of the
    model (loaded lazily: only the probed layers' weights are read), else on a synthetic layer of
    Mixtral-8x7B's 4-bit experts. `tuner` replaces how the probe runs (tests)."""
    from mlx_mixtral.metal.decisions import DecisionCache
    from mlx_mixtral.metal.probe import Tuner, probe_distinct

    out: dict[str, Any] = {
        "available": mx.metal.is_available(),
        "decision_cache": str(DecisionCache().path),
        "reason": None,  # why there is nothing to report
        "source": None,  # what was probed
        "error": None,
        "geometries": [],
    }
    if not mx.metal.is_available() and tuner is None:
        return {**out, "reason": "no Metal, kernels not available"}
    tuner = tuner or Tuner(cache=None)
    if model_dir is None:
        from mlx_mixtral.metal.bench import compare_fused_builtin

        out["source"] = "synthetic layer: Mixtral-8x7B experts, 4-bit group 64, float16"
        out["geometries"] = [compare_fused_builtin(tuner=tuner)]
        return out
    from mlx_mixtral.loader import load_model

    out["source"] = f"{model_dir} (its own layers)"
    try:
        model = load_model(model_dir, lazy=True, kernels="builtin")
    except MixtralError as e:
        return {**out, "error": " ".join(str(e).split())}
    results = probe_distinct(model.moe_experts(), model.args.num_experts_per_tok, tuner)
    out["geometries"] = [r.summary() for r in results]
    if not results:
        out["reason"] = "no MoE layer the fused kernels handle (they take 4/8-bit affine experts)"
    return out


def report(model: str | None = None, read_bytes: int = 256 << 20, tuner: Any = None) -> dict:
    """The whole doctor document (see cli/doctor_schema.json)."""
    doc: dict[str, Any] = {"doctor_format": FORMAT, **system()}
    doc["model"] = None if model is None else model_section(model, read_bytes)
    model_dir = None if doc["model"] is None or doc["model"]["error"] else Path(doc["model"]["path"])
    doc["kernels"] = kernels_section(model_dir, tuner)
    doc["memory"] = memory()  # after the model's load: MLX's wired limit is then the one set for it
    return doc
