"""Mixtral-shaped MLX checkpoints with random 4-bit weights, written straight to safetensors (no
float model, no conversion): for memory and speed measurements, where only sizes and layout matter.

Each quantized matrix gets uniform random 4-bit codes q, scales s = 1 / (4.6 * sqrt(in)) and biases
-7.5 s, so w = s q + b has mean 0 and standard deviation ~1/sqrt(in), as an initialised layer would.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from helpers.tiny_models import mistral_tokenizer_path


def write_random_quantized(path: Path, *, hidden: int, ffn: int, experts: int, top_k: int = 2, layers: int,
                           heads: int = 8, kv_heads: int = 2, vocab: int = 32000, bits: int = 4, group: int = 64,
                           seed: int = 0, max_shard_bytes: int = 2 << 30) -> Path:  # fmt: skip
    """Write the model (stacked experts, mlx-lm layout, several shards when large) and the real
    Mixtral tokenizer into `path`; returns it."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads

    def quantized(rows: int, cols: int, lead: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
        words = rng.integers(0, 2**32, size=(*lead, rows, cols * bits // 32), dtype=np.uint32)
        scale = np.float32(1.0 / (4.6 * np.sqrt(cols)))
        scales = np.full((*lead, rows, cols // group), scale, np.float32)
        return {"weight": words, "scales": scales, "biases": -7.5 * scales}

    def tensors():
        yield "model.embed_tokens", quantized(vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}"
            yield f"{p}.self_attn.q_proj", quantized(heads * head_dim, hidden)
            yield f"{p}.self_attn.k_proj", quantized(kv_heads * head_dim, hidden)
            yield f"{p}.self_attn.v_proj", quantized(kv_heads * head_dim, hidden)
            yield f"{p}.self_attn.o_proj", quantized(hidden, heads * head_dim)
            yield f"{p}.block_sparse_moe.gate", {"weight": rng.standard_normal((experts, hidden), np.float32) / 8}
            for proj, (rows, cols) in (("gate_proj", (ffn, hidden)), ("up_proj", (ffn, hidden)),
                                       ("down_proj", (hidden, ffn))):  # fmt: skip
                yield f"{p}.block_sparse_moe.switch_mlp.{proj}", quantized(rows, cols, (experts,))
            yield f"{p}.input_layernorm", {"weight": np.ones(hidden, np.float32)}
            yield f"{p}.post_attention_layernorm", {"weight": np.ones(hidden, np.float32)}
        yield "model.norm", {"weight": np.ones(hidden, np.float32)}
        yield "lm_head", quantized(vocab, hidden)

    shards, current, size = [], {}, 0
    for module, parts in tensors():
        for kind, value in parts.items():
            array = mx.array(value)
            if value.dtype == np.float32 and kind != "weight" or module.endswith("norm"):
                array = array.astype(mx.bfloat16)  # scales, biases and norms as converted checkpoints store them
            current[f"{module}.{kind}"] = array
            size += array.nbytes
        if size >= max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                            for i in range(len(shards))]  # fmt: skip
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        weight_map.update({t: name for t in shard})
        total += sum(a.nbytes for a in shard.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config = {
        "model_type": "mixtral", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "vocab_size": vocab, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "quantization": {"group_size": group, "bits": bits},
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "tokenizer.model").write_bytes(mistral_tokenizer_path("v1").read_bytes())
    return path
