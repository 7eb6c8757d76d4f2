"""The kernel probe's results, kept between runs so that later loads skip the probe.

One small JSON file in the user's cache directory ($MLX_MIXTRAL_CACHE_DIR, else
$XDG_CACHE_HOME/mlx-mixtral, else ~/Library/Caches/mlx-mixtral on macOS and ~/.cache/mlx-mixtral
elsewhere). Each entry is keyed by everything that can change a result: the chip, the MLX version,
this package's version, a hash of the kernel sources, and the expert geometry. The file is written
whole to a temporary file and renamed over the old one, so a reader never sees half of it; a file
that cannot be read or parsed is treated as empty (and replaced by the next write), never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

import mlx.core as mx

from mlx_mixtral.metal.kernels import DOWN, GATE_UP, ExpertGeometry, kernel_text

CACHE_ENV = "MLX_MIXTRAL_CACHE_DIR"
FILE_NAME = "kernel-probe.json"
FORMAT = 1  # bumped when the file's layout changes; other formats read as empty
MAX_ENTRIES = 64  # oldest entries go first beyond this (several MLX versions, models, chips)


def cache_dir() -> Path:
    """Where this package keeps what it learns about the machine."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mlx-mixtral"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlx-mixtral"
    return Path.home() / ".cache" / "mlx-mixtral"


def package_version() -> str:
    try:
        return metadata.version("mlx-mixtral")
    except metadata.PackageNotFoundError:
        return "unknown"


def kernel_source_hash() -> str:
    """sha256 over what decides the compiled kernels: both bodies, their shared header, and
    kernels.py (input names, template parameters, grid); any edit invalidates old results."""
    digest = hashlib.sha256()
    texts = [*kernel_text(GATE_UP), kernel_text(DOWN)[0]]
    texts.append(resources.files(__package__).joinpath("kernels.py").read_text())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_key(chip: str, geometry: ExpertGeometry) -> dict:
    return {
        "chip": chip,
        "mlx": mx.__version__,
        "package": package_version(),
        "kernel_source": kernel_source_hash(),
        "geometry": geometry.label,
    }


class DecisionCache:
    """get/put of JSON-able probe results under `cache_key` dicts, in one file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / FILE_NAME

    def _entries(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # missing, unreadable or corrupt: as if empty
            return []
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            return []
        return [e for e in data["entries"] if isinstance(e, dict) and isinstance(e.get("key"), dict) and "result" in e]

    def get(self, key: dict):
        return next((e["result"] for e in self._entries() if e["key"] == key), None)

    def put(self, key: dict, result) -> bool:
        """Store `result` under `key`; False when the file could not be written (the caller goes on)."""
        entries = [e for e in self._entries() if e["key"] != key] + [{"key": key, "result": result}]
        text = json.dumps({"format": FORMAT, "entries": entries[-MAX_ENTRIES:]}, indent=1)
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=f".{FILE_NAME}.", delete=False) as f:
                tmp = f.name
                f.write(text)
            os.replace(tmp, self.path)  # atomic on POSIX: readers see the old file or the new one
            return True
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return False
