"""`convert()`: a checkpoint in, an MLX model directory (mlx-lm's format) out, never a half one.

Two passes over the source, one layer at a time. The first builds every output tensor lazily
to learn names, shapes and precisions (nothing is read); it fixes the shard layout and finds
config problems before any work. The second evaluates and writes one module at a time into a
hidden directory next to the destination, renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlx_mixtral.convert.card import upload, write_model_card
from mlx_mixtral.convert.destination import check_destination, check_sibling, overlap, source_paths
from mlx_mixtral.convert.fit import FitChoice, choose_fit
from mlx_mixtral.convert.quant import DEFAULT_BITS, DEFAULT_GROUP, config_entry, make_plan
from mlx_mixtral.convert.shards import Entry, ShardWriter, parse_size
from mlx_mixtral.convert.source import open_source
from mlx_mixtral.convert.transform import Context, convert_group, make_context, plan_outputs
from mlx_mixtral.dtypes import dtype_name, parse_dtype
from mlx_mixtral.errors import ConvertError, OptionError

# Files that travel with the weights (tokenizers of every Mistral generation, chat templates).
COPY_PATTERNS = [
    "tokenizer.model",
    "tokenizer.model.v*",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tekken.json",
]
PARTIAL_TAG = ".partial-"


@dataclass(frozen=True)
class Progress:
    """Reported after each group of tensors (embeddings, each layer, the head) is written."""

    done: int
    total: int
    label: str
    bytes_written: int
    total_bytes: int


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    quantize: bool = False,
    q_bits: int | None = DEFAULT_BITS,
    q_group_size: int | None = DEFAULT_GROUP,
    q_mode: str = "affine",
    recipe: str | None = None,
    dtype: str | mx.Dtype | None = None,
    dequantize: bool = False,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    upload_repo: str | None = None,
    revision: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    fit: str | int | None = None,
    on_fit: Callable[[FitChoice], None] | None = None,
) -> Path:
    """Convert a Hugging Face, Mistral-native or MLX checkpoint (directory or hub id) into an
    MLX model directory at `mlx_path` and return its path.

    quantize/q_bits/q_group_size/q_mode: quantize every linear, expert and embedding layer except
    the MoE routers (modes affine, mxfp4, mxfp8, nvfp4; the last three fix bits and group size).
    recipe: a mixed-precision recipe name from `RECIPES` (implies quantize, mode affine; its two bit
    widths replace q_bits, q_group_size still applies).
    dtype: "float16", "bfloat16" or "float32" for everything not quantized (default: as stored).
    dequantize: turn a quantized MLX checkpoint back into floating point.
    An MLX source without quantize/dequantize is resharded (and cast) with its quantization kept.
    fit: a size ("20GB" or bytes): quantize with the best setting whose output fits (see fit.py;
    replaces q_bits/recipe); `on_fit(choice)` hears the choice before anything is written.
    Raises ConvertError (one line) on any problem; nothing is left at `mlx_path` then.
    """
    dst = Path(os.path.expanduser(mlx_path)).absolute()
    out_dtype = _parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    quantize = quantize or recipe is not None
    if quantize and dequantize:
        raise ConvertError("choose either quantize or dequantize, not both")
    if os.path.lexists(dst) and not force:
        raise ConvertError(f"{dst}: destination already exists (pass force=True / --force to replace it)")

    source = open_source(hf_path, revision=revision)
    protected = source_paths(source.path)
    check_destination(dst, protected)
    if os.path.lexists(dst):
        check_sibling(_aside_path(dst), protected)
    if fit is not None:
        if dequantize or q_mode != "affine":
            raise ConvertError("--fit chooses affine bits or a recipe: it cannot be combined with dequantize or q_mode")
        choice = choose_fit(source, parse_size(fit), group_size=q_group_size, dtype=out_dtype)
        if on_fit is not None:
            on_fit(choice)
        quantize, q_bits, recipe = True, choice.settings.get("q_bits"), choice.settings.get("recipe")
    plan = make_plan(q_bits, q_group_size, q_mode, recipe, source.args.num_hidden_layers) if quantize else None
    ctx = make_context(source, plan, out_dtype, requantize=quantize or dequantize)
    entries, decisions = plan_outputs(ctx)

    created = _missing_parents(dst)
    tmp = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(dst, protected)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{PARTIAL_TAG}{os.getpid()}-", dir=dst.parent))
        _chmod_like_mkdir(tmp)
        _write_model(ctx, tmp, entries, decisions, max_bytes, progress)
        write_model_card(tmp, source, name=dst.name, hub_id=upload_repo)
        _move_into_place(tmp, dst)
        tmp = created = None
    except OSError as e:
        raise ConvertError(f"{e.filename or dst}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in created or ():  # directories made for a destination that never came
            try:
                parent.rmdir()
            except OSError:
                break

    if upload_repo is not None:
        upload(dst, upload_repo)
    return dst


def _parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    try:
        return parse_dtype(dtype)
    except OptionError as e:
        raise ConvertError(str(e)) from None


def _missing_parents(dst: Path) -> list[Path]:
    """The ancestors of `dst` that do not exist yet, deepest first."""
    return [p for p in dst.parents if not os.path.lexists(p)]


def _aside_path(dst: Path) -> Path:
    """Where an existing destination is moved while the new one takes its place (force)."""
    return dst.parent / f".{dst.name}.replaced-{os.getpid()}"


def _write_model(
    ctx: Context,
    out_dir: Path,
    entries: list[Entry],
    decisions: dict,
    max_bytes: int,
    progress: Callable[[Progress], None] | None,
) -> None:
    writer = ShardWriter(out_dir, entries, max_bytes)
    groups = ctx.source.groups()
    # Freed buffers go back to the system at once instead of MLX's cache, so the peak stays
    # at about one module's worth of arrays.
    old_limit = mx.set_cache_limit(0)
    # One writer thread: module i is written while module i+1 is computed (mx.eval releases the
    # GIL). Waiting for the previous write before queueing the next bounds the backlog to one.
    pending: Future | None = None
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            for i, (label, names) in enumerate(groups):
                for _, out, _ in convert_group(ctx.source.load(names), ctx):
                    arrays = {n: mx.contiguous(a) for n, a in out.items()}
                    del out
                    mx.eval(list(arrays.values()))
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(_write_arrays, writer, arrays)
                    del arrays
                if progress is not None:
                    pending.result()
                    progress(Progress(i + 1, len(groups), label, writer.bytes_written, writer.total_bytes))
            if pending is not None:
                pending.result()
        writer.close(ctx.total_parameters)
    finally:
        writer.abort()
        mx.set_cache_limit(old_limit)
    config = _output_config(ctx, decisions)
    (out_dir / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    for pattern in COPY_PATTERNS:
        for f in sorted(ctx.source.path.glob(pattern)):
            shutil.copyfile(f, out_dir / f.name)


def _write_arrays(writer: ShardWriter, arrays: dict[str, mx.array]) -> None:
    for name, array in arrays.items():
        writer.write(name, array)


def _output_config(ctx: Context, decisions: dict[str, dict | bool]) -> dict:
    """The source's config (HF names; built from params.json for native sources) with the new
    quantization and dtype."""
    source = ctx.source
    config = source.args.to_hf_dict() if source.native else dict(source.config)
    for key in ("quantization", "quantization_config", "_name_or_path"):
        config.pop(key, None)
    if ctx.dtype is not None:
        name = dtype_name(ctx.dtype)
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    used = [tuple(sorted(d.items())) for d in decisions.values() if d]
    if used:
        default = ctx.plan.default if ctx.plan else dict(Counter(used).most_common(1)[0][0])
        entry = config_entry(default, decisions)
        # mlx-lm reads "quantization"; "quantization_config" is the key the hub's tooling expects.
        config["quantization"] = entry
        config["quantization_config"] = dict(entry)
    return config


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished directory onto the destination; an old destination (force) is moved
    aside first and deleted only after the new one is in place."""
    old = None
    if os.path.lexists(dst):
        old = _aside_path(dst)
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError:
        if old is not None:  # put the old destination back rather than leave nothing there
            os.rename(old, dst)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes a private (0700) directory; the result should have a normal directory's mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _remove_stale_partials(dst: Path, protected: list[Path]) -> None:
    """Delete hidden partial directories of this destination left by killed conversions (their
    process no longer exists); those of a conversion still running are left alone, and so is
    anything that is, or holds, the source, whatever its name."""
    for d in dst.parent.glob(f".{dst.name}{PARTIAL_TAG}*"):
        pid = d.name[len(f".{dst.name}{PARTIAL_TAG}") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and overlap(d, protected) is None:
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
