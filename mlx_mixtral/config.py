"""Model hyper-parameters read from Hugging Face `config.json` or Mistral `params.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mlx_mixtral.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("mixtral", "mistral")

# Defaults differ between the two model families exactly as in transformers' configs.
_FAMILY_DEFAULTS = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5},
    "mistral": {"rope_theta": 1e4, "rms_norm_eps": 1e-6},
}

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    # 0 experts means a dense Mistral-style SwiGLU MLP in every layer.
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    # Linear position interpolation (`rope_type: linear`); 1.0 is plain RoPE.
    rope_scale: float = 1.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # Mixed-precision quantization as written by mlx-lm's converter (None: not quantized).
    quantization: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.is_moe and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"num_local_experts={self.num_local_experts}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window={self.sliding_window} must be a positive int or null")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def num_parameters(self) -> int:
        """Parameters of the model this config describes (Mixtral-8x7B: 46.7B)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attention = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        ffn = self.num_local_experts * (3 * d * f + d) if self.is_moe else 3 * d * f
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * d + self.num_hidden_layers * (attention + ffn + 2 * d) + d

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a Hugging Face config.json dict (or Mistral params.json, detected by its keys)."""
        if is_native_params(config):
            return cls.from_params(config)
        model_type = config.get("model_type")
        if model_type is None:
            raise ConfigError("config has no 'model_type' (expected one of: mixtral, mistral)")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r} (expected one of: mixtral, mistral)")
        missing = [k for k in _REQUIRED if config.get(k) is None]
        if missing:
            raise ConfigError(f"config is missing required field {missing[0]!r} for model_type {model_type!r}")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {config['hidden_act']!r} (expected 'silu')")

        values = dict(_FAMILY_DEFAULTS[model_type])
        known = {f.name for f in fields(cls)}
        values.update({k: v for k, v in config.items() if k in known and v is not None})
        values["rope_theta"], values["rope_scale"] = _read_rope(config, values["rope_theta"])
        if model_type == "mixtral":
            values.setdefault("num_local_experts", 8)
            values.setdefault("num_experts_per_tok", 2)
        else:
            values["num_local_experts"] = values["num_experts_per_tok"] = 0
        values["quantization"] = _mlx_quantization(config)
        return cls(**values)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ModelArgs:
        """Mistral's native `params.json` (dim, n_layers, n_heads, ..., optional `moe` section)."""
        missing = [k for k in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size") if k not in params]
        if missing:
            raise ConfigError(f"params.json is missing required field {missing[0]!r}")
        moe = params.get("moe") or {}
        return cls(
            model_type="mixtral" if moe else "mistral",
            hidden_size=params["dim"],
            num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"],
            num_key_value_heads=params.get("n_kv_heads"),
            head_dim=params.get("head_dim"),
            intermediate_size=params["hidden_dim"],
            vocab_size=params["vocab_size"],
            num_local_experts=moe.get("num_experts", 0),
            num_experts_per_tok=moe.get("num_experts_per_tok", 0),
            rms_norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 1e6 if moe else 1e4),
            sliding_window=params.get("sliding_window"),
            tie_word_embeddings=params.get("tie_embeddings", False),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json this corresponds to (used when converting native layouts)."""
        out: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.rope_scale != 1.0:
            out["rope_scaling"] = {"rope_type": "linear", "factor": 1.0 / self.rope_scale}
        if self.max_position_embeddings is not None:
            out["max_position_embeddings"] = self.max_position_embeddings
        if self.is_moe:
            out["num_local_experts"] = self.num_local_experts
            out["num_experts_per_tok"] = self.num_experts_per_tok
        return out


def _mlx_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """MLX's quantization dict: `quantization`, else `quantization_config` when it is the same MLX
    dict (mlx-community directories write it under both keys). A `quantization_config` with a
    `quant_method` is another tool's layout (GPTQ, AWQ, bitsandbytes, fp8, ...), whose tensors
    (qweight, qzeros, g_idx, ...) this package does not read."""
    if config.get("quantization") is not None:
        return config["quantization"]
    hf = config.get("quantization_config")
    if isinstance(hf, dict) and "quant_method" in hf:
        method = hf["quant_method"]
        raise ConfigError(
            f"config.json: quantization_config has quant_method {method!r}, a layout this package does not "
            "read; convert the original unquantized checkpoint instead (mlx-mixtral convert --hf-path SRC "
            "--mlx-path DST -q) or use an MLX-quantized model"
        )
    return hf or None


def _read_rope(config: dict[str, Any], default_theta: float) -> tuple[float, float]:
    """RoPE base and position scale from either the hub's top-level `rope_theta`/`rope_scaling`
    or transformers 5's `rope_parameters` block."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta") or params.get("rope_theta") or default_theta
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), 1.0
    if rope_type == "linear":
        return float(theta), 1.0 / float(params["factor"])
    raise ConfigError(f"unsupported rope_type {rope_type!r} in config (expected 'default' or 'linear')")


def is_native_params(config: dict[str, Any]) -> bool:
    """Whether a config dict is Mistral's native params.json (dim, n_layers, ...) rather than HF's."""
    return "dim" in config and "n_layers" in config


CONFIG_NAMES = ("config.json", "params.json")  # Hugging Face's, then Mistral's native one


def config_path(model_dir: str | Path) -> Path | None:
    """The config file of a model directory: config.json, else Mistral's params.json (None: neither)."""
    return next((Path(model_dir) / n for n in CONFIG_NAMES if (Path(model_dir) / n).is_file()), None)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """The raw config dict of a model directory (see `config_path`)."""
    path = config_path(model_dir)
    if path is None:
        raise ConfigError(f"{model_dir}: no config.json or params.json found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
