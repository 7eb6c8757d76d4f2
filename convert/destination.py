"""The one guard for every path the converter writes: the destination, the hidden partial directory
it is built in, an old destination moved aside by --force, and stale partial directories it deletes.

None of them may be the source, hold any of its files, or lie inside it: replacing the destination
would then delete what is being read. The source is its directory plus the real location of every
entry in it (a hub snapshot's files are symlinks into the cache's blobs). The destination must also
be creatable: not an existing file, under directories (not files) that can be written, and not on
a pseudo filesystem such as /proc, which takes no files. Every refusal is a one-line ConvertError
raised before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlx_mixtral.errors import ConvertError

# Kernel filesystems that expose state as files and refuse new ones (Linux /proc/self/mounts names;
# devfs is macOS's /dev).
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "devfs",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "configfs",
        "pstore",
        "bpf",
        "efivarfs",
        "binfmt_misc",
        "fusectl",
        "mqueue",
        "autofs",
    }
)


def source_paths(source_dir: Path) -> list[Path]:
    """The source directory and the real path of everything in it."""
    root = source_dir.resolve()
    return [root, *(entry.resolve() for entry in root.iterdir())]


def overlap(path: Path, protected: list[Path]) -> str | None:
    """How writing (or replacing) `path` would touch the source, or None."""
    real = path.resolve()
    root = protected[0]
    for p in protected:
        if real == p:
            return f"is the source {root}" if p == root else f"is {p}, a file of the source {root}"
        if real in p.parents:
            return f"holds the source {root}" if p == root else f"holds {p}, a file of the source {root}"
    if root in real.parents:
        return f"is inside the source {root}"
    return None


def check_destination(dst: Path, protected: list[Path]) -> None:
    """Refuse a destination the converter must not write (see the module docstring)."""
    touches = overlap(dst, protected)
    if touches:
        raise ConvertError(f"{dst}: the destination {touches}; choose another directory")
    if os.path.lexists(dst) and not dst.is_dir():
        what = "a broken symlink" if dst.is_symlink() and not dst.exists() else "a file"
        raise ConvertError(f"{dst}: is {what}, not a model directory; remove it or choose another path")
    base = _existing_ancestor(dst.parent)
    if not base.is_dir():
        raise ConvertError(f"{dst}: cannot be created, {base} is not a directory")
    fstype = filesystem_type(base)
    if fstype in PSEUDO_FILESYSTEMS:
        raise ConvertError(f"{dst}: cannot be created, {base} is on a {fstype} filesystem, which holds no model files")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConvertError(f"{dst}: cannot be created, {base} is not writable")


def check_sibling(path: Path, protected: list[Path]) -> None:
    """Refuse a partial or replaced-aside directory beside the destination that is (or holds) the source."""
    touches = overlap(path, protected)
    if touches:
        raise ConvertError(f"{path}: the converter's working directory {touches}; rename the source")


def _existing_ancestor(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (a symlink counts as existing)."""
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path`, from Linux's mount table (None without one, as on
    macOS, where writing to devfs then fails with an OSError that is reported the same way)."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    real, best, fstype = str(path.resolve()), -1, None
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # the longest mount point wins; the last of equals is on top
            best, fstype = len(point), fields[2]
    return fstype
