"""`mlx-mixtral doctor`: what this machine is, what MLX sees, how much memory and disk speed a model
gets, and whether the fused Metal kernels build, agree and pay off here.

    mlx-mixtral doctor [--model M] [--json]

The JSON document (`--json`, on stdout; its schema is doctor_schema.json next to this file) is what
to paste into a bug report. Off a Mac it reports the CPU backend and no kernels.
"""

from __future__ import annotations

import argparse
import json
import sys

from mlx_mixtral.diagnostics import report
from mlx_mixtral.metal.probe import probe_line

GIB = 1024**3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-mixtral doctor", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument(
        "--model",
        default=None,
        help="a model directory or hub id already downloaded: its memory fit, disk speed and own kernel geometries",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON (for bug reports)")
    p.add_argument("--read-mb", type=int, default=256, help="MiB of a weight file to read for the disk speed")
    return p


def _gib(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def text(doc: dict) -> list[str]:
    """The report as lines for a person."""
    p, mlx, mem = doc["platform"], doc["mlx"], doc["memory"]
    system = f"macOS {p['macos']} {p['machine']} ({p['system']} {p['release']})" if p["macos"] else None
    lines = [
        f"mlx-mixtral  {doc['mlx_mixtral']}",
        f"platform     {system or ' '.join((p['system'], p['release'], p['machine']))}",
        f"python       {doc['python']['version']} ({doc['python']['executable']})",
        f"mlx          {mlx['version']}, backend {mlx['backend']}, default device {mlx['default_device']}",
        f"device       {doc['device']['name']} ({doc['device']['architecture']})",
    ]
    memory = f"memory       {_gib(mem['total_bytes'])} total"
    if mem["available_bytes"] is not None:
        memory += f", {_gib(mem['available_bytes'])} available"
    if mem["gpu_working_set_bytes"] is not None:
        memory += f", GPU working set {_gib(mem['gpu_working_set_bytes'])}"
    if mem["mlx_wired_limit_bytes"] is not None:
        memory += f", MLX wired limit {_gib(mem['mlx_wired_limit_bytes'])}"
    if mem["system_wired_limit_mb"] is not None:
        memory += f", iogpu.wired_limit_mb {mem['system_wired_limit_mb']} (0: the macOS default)"
    lines.append(memory)
    model = doc["model"]
    if model is not None:
        lines += _model_lines(model)
    lines += _kernel_lines(doc["kernels"])
    return lines


def _model_lines(model: dict) -> list[str]:
    lines = [f"model        {model['path'] or model['argument']}"]
    if model["error"]:
        lines.append(f"             error: {model['error']}")
    fit = model.get("memory_plan")
    if fit:
        lines.append(f"memory       {fit['line']}")
    disk = model.get("disk_read")
    if disk and "error" in disk:
        lines.append(f"disk         error: {disk['error']}")
    elif disk:
        cached = "; the page cache may have served it" if disk["may_be_cached"] else ""
        lines.append(
            f"disk         {disk['gb_per_s']:.2f} GB/s reading {_gib(disk['bytes'])} of "
            f"{disk['file']} (page cache: {disk['page_cache']}{cached})"
        )
    return lines


def _kernel_lines(kernels: dict) -> list[str]:
    if kernels["error"]:
        return [f"kernels      error: {kernels['error']}"]
    if not kernels["geometries"]:
        return [f"kernels      {kernels['reason']}"]
    lines = [
        f"kernels      probed now on {kernels['source']}; load-time decisions are kept in {kernels['decision_cache']}"
    ]
    for g in kernels["geometries"]:
        lines.append(f"  {g['geometry']}: {probe_line(g)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.read_mb < 1:
        print("mlx-mixtral doctor: --read-mb must be >= 1", file=sys.stderr)
        return 2
    print("mlx-mixtral doctor: checking (the kernel probe takes a few seconds on a Mac)", file=sys.stderr)
    doc = report(args.model, args.read_mb << 20)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(text(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
