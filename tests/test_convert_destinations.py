"""The converter's destination guard, case by case: whatever the destination (the source, a file
of it, inside it, a parent of it, a symlink into it, a file, unwritable, a pseudo filesystem, a
full disk) the source is byte-identical afterwards, a refusal is one line, and nothing is left."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

from mlx_mixtral.convert import convert
from mlx_mixtral.errors import ConvertError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return add_tokenizer(make_hf_checkpoint(tmp_path_factory.mktemp("hf"), intermediate_size=128))


def fingerprint(root: Path) -> dict[str, str]:
    """Every entry under `root` (symlinks as their target) with its content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir()
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode
        == 0
    )


@pytest.fixture
def mounts():
    made = []

    def mount(where: Path, options: str) -> None:
        if not _mount_tmpfs(where, options):
            pytest.skip(
                f"cannot mount a tmpfs here (mount -t tmpfs -o {options}; needs root in a sandbox that allows it)"
            )
        made.append(where)

    yield mount
    for where in reversed(made):
        subprocess.run(["umount", str(where)], check=True)


def _source_itself(src, tmp):
    return src


def _a_file_of_the_source(src, tmp):
    return src / "model.safetensors"


def _inside_the_source(src, tmp):
    return src / "converted"


def _the_parent_of_the_source(src, tmp):
    return src.parent


def _a_symlink_to_the_source(src, tmp):
    os.symlink(src, tmp / "link")
    return tmp / "link"


def _a_symlink_to_a_source_file(src, tmp):
    os.symlink(src / "model.safetensors", tmp / "link")
    return tmp / "link"


def _under_a_symlink_into_the_source(src, tmp):
    os.symlink(src, tmp / "link")
    return tmp / "link" / "out"


def _an_existing_file(src, tmp):
    (tmp / "notes.txt").write_text("keep me")
    return tmp / "notes.txt"


def _under_an_existing_file(src, tmp):
    (tmp / "notes.txt").write_text("keep me")
    return tmp / "notes.txt" / "out"


def _a_broken_symlink(src, tmp):
    os.symlink(tmp / "gone", tmp / "link")
    return tmp / "link"


def _proc(src, tmp):
    return Path("/proc/mlx-mixtral-test-out")


def _under_etc_passwd(src, tmp):
    return Path("/etc/passwd/out")


REFUSED = [
    (_source_itself, "the destination is the source"),
    (_a_file_of_the_source, "the destination is .*model.safetensors, a file of the source"),
    (_inside_the_source, "the destination is inside the source"),
    (_the_parent_of_the_source, "the destination holds the source"),
    (_a_symlink_to_the_source, "the destination is the source"),
    (_a_symlink_to_a_source_file, "a file of the source"),
    (_under_a_symlink_into_the_source, "the destination is inside the source"),
    (_an_existing_file, "is a file, not a model directory"),
    (_under_an_existing_file, "notes.txt is not a directory"),
    (_a_broken_symlink, "is a broken symlink, not a model directory"),
    (_proc, "/proc is on a proc filesystem"),
    (_under_etc_passwd, "/etc/passwd is not a directory"),
]


@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
@pytest.mark.parametrize("where, message", REFUSED, ids=[f.__name__.strip("_") for f, _ in REFUSED])
def test_refused_destinations_leave_the_source_as_it_was(tmp_path, hf_dir, where, message, force):
    src = Path(shutil.copytree(hf_dir, tmp_path / "area" / "src"))
    dst = where(src, tmp_path)
    before, around = fingerprint(src), fingerprint(tmp_path)
    with pytest.raises(ConvertError) as e:
        convert(src, dst, force=force)
    text = str(e.value)
    assert "\n" not in text
    if force or not os.path.lexists(dst):  # without --force an existing path is refused as existing
        assert re.search(message, text), text
    else:
        assert "already exists" in text
    assert fingerprint(src) == before
    assert fingerprint(tmp_path) == around  # no partial directory, no stray parents


def test_an_unwritable_directory_is_refused(tmp_path, hf_dir, mounts):
    src = Path(shutil.copytree(hf_dir, tmp_path / "src"))
    before = fingerprint(src)
    locked = tmp_path / "locked"
    if os.geteuid() == 0:  # root writes through permission bits; a read-only mount stops it
        mounts(locked, "ro,size=64k")
    else:
        locked.mkdir()
        locked.chmod(0o555)
    with pytest.raises(ConvertError, match=f"^{locked / 'a' / 'out'}: cannot be created, {locked} is not writable$"):
        convert(src, locked / "a" / "out")
    assert fingerprint(src) == before and list(locked.iterdir()) == []


def test_a_full_disk_leaves_nothing_and_says_so_in_one_line(tmp_path, hf_dir, mounts):
    src = Path(shutil.copytree(hf_dir, tmp_path / "src"))
    before = fingerprint(src)
    small = tmp_path / "small"
    mounts(small, "size=96k")  # room for the small files, not the weights
    with pytest.raises(ConvertError, match="No space left on device$") as e:
        convert(src, small / "deeper" / "out")
    assert "\n" not in str(e.value)
    assert list(small.iterdir()) == []  # the partial directory and the parents made for it are gone
    assert fingerprint(src) == before


def test_a_failed_replacement_keeps_the_old_destination(tmp_path, hf_dir, mounts):
    """--force onto an existing model on a full disk: the old model stays where it was."""
    src = Path(shutil.copytree(hf_dir, tmp_path / "src"))
    small = tmp_path / "small"
    mounts(small, "size=96k")
    (small / "out").mkdir()
    (small / "out" / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match="No space left on device$"):
        convert(src, small / "out", force=True)
    assert sorted(p.name for p in small.iterdir()) == ["out"]
    assert (small / "out" / "config.json").read_text() == "{}"


def test_a_source_named_like_a_dead_partial_is_not_cleaned_up(tmp_path, hf_dir):
    """Stale partial directories of killed runs are deleted, but never the source, whatever its name."""
    src = Path(shutil.copytree(hf_dir, tmp_path / ".out.partial-99999999-abc"))
    stale = tmp_path / ".out.partial-99999998-xyz"
    stale.mkdir()
    before = fingerprint(src)
    out = convert(src, tmp_path / "out")
    assert (out / "config.json").is_file() and fingerprint(src) == before and not stale.exists()


def test_a_source_named_like_the_replaced_aside_directory_is_refused(tmp_path, hf_dir):
    src = Path(shutil.copytree(hf_dir, tmp_path / f".out.replaced-{os.getpid()}"))
    (tmp_path / "out").mkdir()
    before = fingerprint(src)
    with pytest.raises(ConvertError, match="the converter's working directory is the source"):
        convert(src, tmp_path / "out", force=True)
    assert fingerprint(src) == before and (tmp_path / "out").is_dir()


def test_a_hub_snapshot_s_blobs_are_part_of_the_source(tmp_path, hf_dir):
    """A hub snapshot holds symlinks into the cache's blobs; replacing the blobs folder would delete them."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in hf_dir.iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(blobs / f.name, snapshot / f.name)
    before = fingerprint(blobs)
    with pytest.raises(ConvertError, match="holds .*a file of the source"):
        convert(snapshot, blobs, force=True)
    assert fingerprint(blobs) == before


def test_new_parent_directories_are_made_and_the_cli_reports_refusals_in_one_line(tmp_path, hf_dir):
    out = convert(hf_dir, tmp_path / "a" / "b" / "out")
    assert (out / "config.json").is_file()
    for dst in [hf_dir / "model.safetensors", "/proc/foo", "/etc/passwd/out"]:
        r = subprocess.run(
            [sys.executable, "-m", "mlx_mixtral", "convert", "--hf-path", str(hf_dir), "--mlx-path", str(dst)]
            + ["--force", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mlx-mixtral convert: error: {dst}: "), r.stderr
