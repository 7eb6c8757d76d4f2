"""The memory plan: will a model fit, all resident, with some experts offloaded, or not at all.

Made from config.json and the safetensors headers alone (for a hub id: the config and the headers,
read by range requests, before any weight is downloaded), so the answer comes before the download:

    resident   non-expert weights + all experts + KV cache + runtime overhead <= budget
    offload    non-expert weights + KV cache + overhead + N experts <= budget, N >= one per MoE layer:
               the experts live in an expert cache of N slots and are read from the model's own
               files on a miss (mlx_mixtral.offload)
    refuse     not even that fits; the plan says what would (a smaller quantization, a shorter KV
               cache, the wired-memory sysctl)

Sizes are what the loader will hold: floating-point tensors at the compute dtype (float32 on the
CPU backend, whose quantized matmul is fastest with float32 scales; the checkpoint's own on a GPU),
packed quantized weights as stored. The KV cache is counted at the context it will use: a sliding
window or `max_kv_size` when there is one, else the model's whole context.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import mlx.core as mx

from mlx_mixtral.config import ModelArgs, read_config
from mlx_mixtral.dtypes import SAFETENSORS, compute_dtype
from mlx_mixtral.errors import ConfigError, LoadError, OptionError, WeightsError
from mlx_mixtral.memory.budget import WIRED_LIMIT_ADVICE, Budget, gb, parse_bytes
from mlx_mixtral.model import kv_window, weight_part
from mlx_mixtral.weights import find_weight_files, read_headers

# name -> (safetensors dtype code, shape)
TensorShapes = dict[str, tuple[str, tuple[int, ...]]]

# Fixed part of the runtime overhead: MLX's buffer cache between steps, the Python process, the
# offload reader's staging buffers. The rest is the activations of one prefill chunk (see overhead).
FIXED_OVERHEAD = 256 << 20
PREFILL_CHUNK = 512  # generate.DEFAULT_PREFILL_CHUNK (not imported: generate imports the tokenizer stack)
DEFAULT_CONTEXT = 32768  # when config.json does not say
# Bits per weight of the affine recipes the advice may suggest (group 64, 16-bit scale and bias:
# +0.5 bit), largest first.
SMALLER_RECIPES = [("4-bit", 4.5), ("3-bit", 3.5), ("2-bit", 2.5)]


@dataclass(frozen=True)
class MemoryPlan:
    decision: Literal["resident", "offload", "refuse"]
    parts: dict[str, int]  # resident bytes by part of the model (embedding, attention, experts, ...)
    expert_bytes: int  # one expert of one layer (gate + up + down), resident form; 0 for dense models
    num_experts: int  # experts in all MoE layers (E * MoE layers)
    moe_layers: int
    experts_resident: int  # experts the plan keeps in memory (all of them when resident)
    kv_bytes: int
    context: int  # tokens the KV cache was counted for
    overhead: int
    budget: Budget
    compute_dtype: str
    advice: list[str] = field(default_factory=list)

    @property
    def non_expert_bytes(self) -> int:
        return sum(v for k, v in self.parts.items() if k != "experts")

    @property
    def weight_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def needed_resident(self) -> int:
        """Bytes for everything resident: weights, KV cache, overhead."""
        return self.weight_bytes + self.kv_bytes + self.overhead

    def layer_slots(self) -> list[int]:
        """Expert-cache slots of each MoE layer: the resident experts spread as evenly as they go."""
        base, extra = divmod(self.experts_resident, self.moe_layers)
        return [
            base + (i * extra // self.moe_layers != (i + 1) * extra // self.moe_layers) for i in range(self.moe_layers)
        ]

    def with_expert_cache(self, size: str | float | int) -> MemoryPlan:
        """This plan, but offloading with an expert cache of `size`: a share of the experts ("30%"
        or 0.3) or bytes ("8GB"); at least one expert per MoE layer."""
        if not self.num_experts:
            raise OptionError("expert_cache: a dense model has no experts to offload", option="expert_cache")
        if isinstance(size, float) or (isinstance(size, str) and size.strip().endswith("%")):
            share = float(str(size).strip().rstrip("%")) / (100 if isinstance(size, str) else 1)
            if not 0 < share <= 1:
                raise OptionError(f"expert_cache {size!r}: expected a share in (0, 100%]", option="expert_cache")
            count = round(share * self.num_experts)
        else:
            count = parse_bytes(size, "expert_cache") // self.expert_bytes
        count = max(self.moe_layers, min(count, self.num_experts))
        return replace(self, decision="offload", experts_resident=count)

    def line(self) -> str:
        """The plan in one line, for stderr before loading."""
        fixed = f"KV cache {gb(self.kv_bytes)} ({self.context} tokens), overhead {gb(self.overhead)}"
        budget = f"budget {gb(self.budget.bytes)} ({self.budget.source})"
        if self.decision == "resident":
            return f"plan: all resident: weights {gb(self.weight_bytes)}, {fixed}; {budget}"
        if self.decision == "offload":
            share = self.experts_resident / self.num_experts
            return (
                f"plan: offload experts: non-expert weights {gb(self.non_expert_bytes)}, {fixed}, expert cache "
                f"{gb(self.experts_resident * self.expert_bytes)} = {self.experts_resident} of {self.num_experts} "
                f"experts ({share:.0%}), the rest read from disk when used; {budget}"
            )
        return self.refusal()

    def refusal(self) -> str:
        what = (
            f"the weights without the experts ({gb(self.non_expert_bytes)}) + one expert per layer"
            if self.num_experts
            else f"the weights ({gb(self.weight_bytes)})"
        )
        return (
            f"does not fit: {what} + KV cache {gb(self.kv_bytes)} ({self.context} tokens) + overhead "
            f"{gb(self.overhead)} exceed the budget of {gb(self.budget.bytes)} ({self.budget.source})"
            + (f"; {'; '.join(self.advice)}" if self.advice else "")
        )

    def as_dict(self) -> dict:
        return {
            "decision": self.decision,
            "parts": dict(self.parts),
            "non_expert_bytes": self.non_expert_bytes,
            "expert_bytes": self.expert_bytes,
            "num_experts": self.num_experts,
            "experts_resident": self.experts_resident,
            "kv_bytes": self.kv_bytes,
            "context": self.context,
            "overhead": self.overhead,
            "budget_bytes": self.budget.bytes,
            "budget_source": self.budget.source,
            "compute_dtype": self.compute_dtype,
            "advice": list(self.advice),
        }


def plan(
    path_or_repo: str | Path,
    max_memory: str | int | None = None,
    max_kv_size: int | None = None,
    *,
    revision: str | None = None,
    dtype: mx.Dtype | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    sequences: int = 1,
) -> MemoryPlan:
    """The memory plan of a local model directory or hub id (see the module docstring). For a hub
    id only config.json and the safetensors headers are fetched. The KV cache is counted for
    `sequences` caches at once (a server's batch), stored quantized when `kv_bits` is given."""
    config, tensors = read_shapes(path_or_repo, revision=revision)
    try:
        args = ModelArgs.from_dict(config)
    except ConfigError as e:
        raise LoadError(f"{path_or_repo}: {e}") from None
    return plan_model(
        args,
        tensors,
        Budget.of_machine(max_memory),
        max_kv_size=max_kv_size,
        dtype=dtype,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        sequences=sequences,
    )


def read_shapes(path_or_repo: str | Path, revision: str | None = None) -> tuple[dict, TensorShapes]:
    """(config dict, tensor shapes) of a local directory, else of a hub repository by metadata only."""
    from mlx_mixtral.loader import local_or_hub

    path = local_or_hub(path_or_repo)
    if isinstance(path, Path):
        try:
            headers = read_headers(find_weight_files(path))
            return read_config(path), {n: (t.dtype, t.shape) for n, t in headers.items()}
        except (ConfigError, WeightsError) as e:
            raise LoadError(str(e)) from None
    return _hub_shapes(path, revision)


def _hub_shapes(repo: str, revision: str | None) -> tuple[dict, TensorShapes]:
    from huggingface_hub import get_safetensors_metadata, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from mlx_mixtral.loader import hub_error

    try:  # a model already in the hub cache is read from there (also offline)
        cached = Path(snapshot_download(repo, revision=revision, local_files_only=True))
        return read_shapes(cached)
    except (LocalEntryNotFoundError, LoadError, OSError):
        pass
    try:
        config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision)).read_text())
        meta = get_safetensors_metadata(repo, revision=revision)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise LoadError(f"{hub_error(repo, revision, e)}; there is no local directory {repo!r} either") from None
    tensors = {
        name: (info.dtype, tuple(info.shape))
        for file in meta.files_metadata.values()
        for name, info in file.tensors.items()
    }
    return config, tensors


def overhead(args: ModelArgs) -> int:
    """Runtime memory besides weights and KV cache: FIXED_OVERHEAD plus the float32 activations of
    one prefill chunk: hidden states and norms, the K experts' SwiGLU intermediates, and every
    head's attention scores of the chunk against itself."""
    d, f = args.hidden_size, args.intermediate_size
    k = max(args.num_experts_per_tok, 1)
    per_token = 12 * d + 3 * k * f + args.num_attention_heads * PREFILL_CHUNK
    return FIXED_OVERHEAD + PREFILL_CHUNK * per_token * 4


def kv_context(args: ModelArgs, max_kv_size: int | None) -> int:
    """Tokens the KV cache holds at most: the window (sliding window or max_kv_size), else the context."""
    window = kv_window(args.sliding_window, max_kv_size)
    context = args.max_position_embeddings or DEFAULT_CONTEXT
    return min(window, context) if window else context


def kv_bytes(args: ModelArgs, context: int, itemsize: int, bits: int | None = None, group_size: int = 64) -> int:
    """Keys and values of every layer for `context` tokens; quantized to `bits`, each element takes
    bits/8 bytes plus its group's scale and bias (compute dtype) shared by `group_size` elements."""
    elements = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * context
    if bits is None:
        return elements * itemsize
    return elements * bits // 8 + elements // group_size * 2 * itemsize


def plan_model(
    args: ModelArgs,
    tensors: TensorShapes,
    budget: Budget,
    *,
    max_kv_size: int | None = None,
    dtype: mx.Dtype | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    sequences: int = 1,
) -> MemoryPlan:
    """The plan for a model of `args` stored as `tensors`, in `budget` bytes (pure: no I/O)."""
    floats = [SAFETENSORS[c].mlx for n, (c, _) in tensors.items() if SAFETENSORS[c].is_float and n.endswith("weight")]
    compute = dtype or compute_dtype(floats)
    parts: dict[str, int] = {}
    for name, (code, shape) in tensors.items():
        storage = SAFETENSORS[code]
        size = math.prod(shape) * (compute.size if storage.is_float else storage.nbytes)
        part = weight_part(name)
        parts[part] = parts.get(part, 0) + size
    if args.tie_word_embeddings:
        parts.pop("lm_head", None)
    moe_layers = args.num_hidden_layers if args.is_moe else 0
    num_experts = moe_layers * args.num_local_experts
    expert_bytes = parts.get("experts", 0) // num_experts if num_experts else 0
    context = kv_context(args, max_kv_size)
    kv = sequences * kv_bytes(args, context, compute.size, kv_bits, kv_group_size)
    extra = overhead(args)
    fixed = sum(v for k, v in parts.items() if k != "experts") + kv + extra

    def made(decision: str, resident: int, advice: list[str] | None = None) -> MemoryPlan:
        return MemoryPlan(decision, parts, expert_bytes, num_experts, moe_layers, resident, kv, context, extra,
                          budget, str(compute).split(".")[-1], advice or [])  # fmt: skip

    if fixed + parts.get("experts", 0) <= budget.bytes:
        return made("resident", num_experts)
    room = budget.bytes - fixed
    slots = room // expert_bytes if expert_bytes else 0
    if num_experts and slots >= moe_layers:
        return made("offload", int(min(slots, num_experts)), _advice(args, parts, kv, extra, budget, compute))
    return made("refuse", 0, _advice(args, parts, kv, extra, budget, compute))


def _advice(
    args: ModelArgs, parts: dict[str, int], kv: int, extra: int, budget: Budget, compute: mx.Dtype
) -> list[str]:
    """What would let the whole model be resident."""
    out = []
    weights = sum(parts.values())
    params = args.num_parameters()
    for name, bits in SMALLER_RECIPES:
        size = int(params * bits / 8)
        if size < weights and size + kv + extra <= budget.bytes:
            fit = f"{(budget.bytes - kv - extra) / 1e9:.1f}GB"
            out.append(f"a {name} conversion (~{gb(size)}) would fit resident (mlx-mixtral convert --fit {fit})")
            break
    short = kv_bytes(args, 4096, compute.size)
    if kv > short:
        out.append(f"--max-kv-size 4096 would free {gb(kv - short)} of KV cache")
    if mx.metal.is_available():
        out.append(WIRED_LIMIT_ADVICE)
    return out
