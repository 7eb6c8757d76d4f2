"""Timing generation on this machine: prefill/decode tok/s, the memory-bandwidth roofline of Apple
chips, and one MoE layer fused vs built-in. The library half of `mlx-mixtral bench` (cli/bench.py);
benchmarks/ uses it too.

A decode token must stream the weights it uses (attention, router, the K routed experts, one
embedding row, the output head) plus the KV cache once, so tok/s <= bandwidth / those bytes.
"""

from __future__ import annotations

import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_mixtral.language_model import LanguageModel

# Unified-memory bandwidth in GB/s from Apple's specifications. Where a chip comes in two
# GPU bins with different memory systems (M3 Max, M4 Max), the larger bin's figure is listed:
# pass --bandwidth for the smaller one (M3 Max 30-core: 300, M4 Max 32-core: 410).
APPLE_BANDWIDTH_GBS = {
    "M1": 68.25,
    "M1 Pro": 200,
    "M1 Max": 400,
    "M1 Ultra": 800,
    "M2": 100,
    "M2 Pro": 200,
    "M2 Max": 400,
    "M2 Ultra": 800,
    "M3": 100,
    "M3 Pro": 150,
    "M3 Max": 400,
    "M3 Ultra": 819,
    "M4": 120,
    "M4 Pro": 273,
    "M4 Max": 546,
}


def device_name() -> str:
    """'Apple M2 Max' on a Mac (MLX's device info, else sysctl), the CPU's name elsewhere."""
    # The GPU's info, not the default device's: a Mac whose default device is the CPU describes the
    # CPU there, and a CPU-only build's GPU info is empty.
    device = mx.gpu if mx.metal.is_available() else mx.cpu
    try:
        name = str(mx.device_info(device).get("device_name", ""))
    except Exception:  # older MLX builds without device_info
        name = ""
    if not name and sys.platform == "darwin":
        try:
            name = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except OSError:
            name = ""
    return name or platform.processor() or platform.machine()


def chip_bandwidth(name: str) -> float | None:
    """GB/s for an Apple chip name such as 'Apple M3 Pro'; None when the chip is not in the table."""
    words = name.replace("Apple", "").split()
    for n in (2, 1):  # 'M2 Max' before 'M2'
        key = " ".join(words[:n])
        if len(words) >= n and key in APPLE_BANDWIDTH_GBS:
            return float(APPLE_BANDWIDTH_GBS[key])
    return None


@dataclass
class Timing:
    prompt_tokens: int
    decode_tokens: int
    prefill_s: float  # prompt in, first token out
    decode_s: float  # first token out to last token out

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_tokens else math.nan


def time_generation(steps: Iterator[Any], prompt_tokens: int, decode_tokens: int) -> Timing:
    """Drive a token generator made for `decode_tokens + 1` tokens (the first comes from the
    prefill) and time it. Works for this package's generate_step and mlx-lm's alike."""
    start = time.perf_counter()
    first = last = start
    n = 0
    for n, _ in enumerate(steps, start=1):
        last = time.perf_counter()
        if n == 1:
            first = last
    mx.synchronize()
    if n != decode_tokens + 1:
        raise RuntimeError(f"generator produced {n} tokens, expected {decode_tokens + 1}")
    return Timing(prompt_tokens, decode_tokens, first - start, last - first)


def random_prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    """Token ids spread over the vocabulary (ids 0-2 are BOS/EOS/UNK in Mistral's tokenizers)."""
    key = mx.random.key(seed)
    return mx.random.randint(3, vocab, (length,), key=key).tolist()


def kv_bytes_per_token(args: Any, context: int, itemsize: int) -> int:
    """KV cache bytes a decode step reads at `context` positions (keys and values, all layers)."""
    seen = context if args.sliding_window is None else min(context, args.sliding_window)
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * seen * itemsize


def measure_ours(model: LanguageModel, prompt_len: int, decode_tokens: int, reps: int, seed: int = 0) -> dict:
    """Median prefill and decode tok/s of this package's generate_step, and the peak memory."""
    from mlx_mixtral.generate import generate_step

    ids = random_prompt(prompt_len, model.args.vocab_size, seed)
    runs, peaks = [], []
    for _ in range(reps):
        mx.clear_cache()
        mx.reset_peak_memory()
        runs.append(time_generation(generate_step(ids, model, max_tokens=decode_tokens + 1), prompt_len, decode_tokens))
        peaks.append(mx.get_peak_memory())
    return {
        "prompt_tokens": prompt_len,
        "decode_tokens": decode_tokens,
        "reps": reps,
        "prefill_tps": statistics.median(r.prefill_tps for r in runs),
        "decode_tps": statistics.median(r.decode_tps for r in runs),
        "peak_gb": max(peaks) / 1e9,
    }


def fused_vs_builtin(model: Any, tuner: Any = None) -> dict:
    """The kernel probe on this model's first expert geometry the kernels handle (metal/probe.py: every
    fused variant built, checked and timed at one decode token against the built-in ops; `tuner`: how,
    None the real kernels and no decision cache), or {"skipped": why}."""
    if not mx.metal.is_available():
        return {"skipped": "the fused kernels need a Metal GPU"}
    from mlx_mixtral.metal.probe import Tuner, probe_distinct

    results = probe_distinct(model.moe_experts(), model.args.num_experts_per_tok, tuner or Tuner(cache=None))
    if not results:
        return {"skipped": "no MoE layer the fused kernels handle (4/8-bit affine experts)"}
    return results[0].summary()


def roofline(bandwidth: float | None, weight_bytes: int, args: Any, context: int, itemsize: int) -> float | None:
    """Decode tok/s if every step streamed `weight_bytes` plus the KV cache at full bandwidth."""
    if bandwidth is None:
        return None
    return bandwidth * 1e9 / (weight_bytes + kv_bytes_per_token(args, context, itemsize))


def plot(rows: list[dict], path: str, title: str) -> None:
    """Prefill and decode tok/s against context length, one line per kernel setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for setting in sorted({r["kernels"] for r in rows}):
        mine = [r for r in rows if r["kernels"] == setting]
        x = [r["prompt_tokens"] for r in mine]
        axes[0].plot(x, [r["prefill_tps"] for r in mine], marker="o", label=f"kernels {setting}")
        axes[1].plot(x, [r["decode_tps"] for r in mine], marker="o", label=f"kernels {setting}")
        if mine[0]["roofline_tps"] is not None:
            axes[1].plot(x, [r["roofline_tps"] for r in mine], linestyle="--", label="bandwidth roofline")
    for ax, what in zip(axes, ["prefill", "decode"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{what} tok/s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
