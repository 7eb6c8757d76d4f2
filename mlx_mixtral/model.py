"""The Mixtral decoder (and its dense Mistral sibling) in MLX.

Shapes: B batch, L new tokens, S cached + new tokens, D hidden, H query heads, Hkv key/value
heads, Dh head dim, E experts, K experts per token, F expert (or MLP) hidden, V vocab.
Attribute names follow the Hugging Face checkpoint so `sanitize` stays a short name mapping.
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_mixtral.batching.cache import BatchKVCache
from mlx_mixtral.cache import Cache, KVCache, RotatingKVCache, check_kv_quantization
from mlx_mixtral.config import ModelArgs
from mlx_mixtral.errors import OptionError, WeightsError
from mlx_mixtral.experts import SwitchGLU, kernel_choice, route
from mlx_mixtral.metal.probe import choose_kernels
from mlx_mixtral.offload.switch import OffloadedSwitchGLU


def attention_mask(offset: int, length: int, keys: int, window: int | None) -> mx.array | str | None:
    """Mask for `length` queries at absolute positions offset.. over the last `keys` positions.

    Query i (position offset+i) sees key position p when p <= offset+i and, with a sliding
    window, offset+i - p < window (Mistral's window counts the query itself).
    """
    if length == 1 and (window is None or keys <= window):
        return None
    if window is None or offset + length <= window:
        return "causal"
    q_pos = mx.arange(offset, offset + length)[:, None]  # (L, 1)
    k_pos = mx.arange(offset + length - keys, offset + length)[None, :]  # (1, S)
    return (k_pos <= q_pos) & (q_pos - k_pos < window)  # (L, S)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        self.window = args.sliding_window
        self.rope_theta, self.rope_scale = args.rope_theta, args.rope_scale
        d = args.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        # HF's Mistral/Mixtral rotate the two halves of each head (non-interleaved: traditional=False).
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.rope_theta, scale=self.rope_scale, offset=offset
        )

    def __call__(self, x: mx.array, cache: Cache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, Dh)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, Dh)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, Dh)
        batched = isinstance(cache, BatchKVCache)  # rows of different lengths, left-padded
        offset = 0 if cache is None else cache.offset  # slots before the new ones
        rope_offset = cache.rope_offsets() if batched else offset  # (B,) per-row positions when batched
        q, k = self._rope(q, rope_offset), self._rope(k, rope_offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, S, Dh)
        window = kv_window(self.window, None if cache is None else cache.max_size)
        S = (k[0] if isinstance(k, tuple) else k).shape[2]
        mask = attention_mask(offset, L, S, window)
        if batched:
            mask = cache.mask(mask, L)  # (B, 1, L, S) once rows are padded
        if isinstance(k, tuple):  # a quantized cache (kv_bits): (packed, scales, biases) keys and values
            out = quantized_attention(q, k, v, self.scale, mask, cache.group_size, cache.bits)  # (B, H, L, Dh)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # (B, H, L, Dh)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, D)


def quantized_attention(
    q: mx.array,
    k: tuple[mx.array, ...],
    v: tuple[mx.array, ...],
    scale: float,
    mask: mx.array | str | None,
    group_size: int,
    bits: int,
) -> mx.array:
    """Softmax attention over keys/values stored by mx.quantize, read with quantized matmuls so the
    cache is never dequantized as a whole (mx.fast.scaled_dot_product_attention takes float keys)."""
    B, H, L, Dh = q.shape
    Hkv, S = k[0].shape[1], k[0].shape[2]
    q = (q * scale).reshape(B, Hkv, H // Hkv, L, Dh)  # (B, Hkv, H/Hkv, L, Dh): query heads grouped per KV head
    k = tuple(mx.expand_dims(part, 2) for part in k)  # (B, Hkv, 1, S, .) each part
    v = tuple(mx.expand_dims(part, 2) for part in v)
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)  # (B, Hkv, H/Hkv, L, S)
    if isinstance(mask, str):  # "causal": query i sees the first S - L + i + 1 keys
        mask = mx.arange(S)[None, :] <= mx.arange(S - L, S)[:, None]  # (L, S)
    if mask is not None:
        if mask.ndim == 4:  # (B, 1, L, S) per-row mask of a batch: broadcast over the query groups too
            mask = mx.expand_dims(mask, 2)  # (B, 1, 1, L, S)
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1, precise=True).astype(q.dtype)  # (B, Hkv, H/Hkv, L, S)
    out = mx.quantized_matmul(weights, *v, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, H, L, Dh)  # (B, H, L, Dh)


def kv_window(model_window: int | None, max_kv_size: int | None) -> int | None:
    """How many most recent positions a query may see. A bounded cache (user `max_kv_size`)
    turns attention into a sliding window of its size, like Mistral's rolling buffer."""
    if max_kv_size is None:
        return model_window
    return max_kv_size if model_window is None else min(model_window, max_kv_size)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward of Mistral-7B-style models."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Mixtral's sparse MoE block: a linear router picks K of E SwiGLU experts per token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.intermediate_size, args.num_local_experts)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = route(self.gate(x), self.k)  # (B, L, K), (B, L, K)
        return self.switch_mlp(x, indices, weights)  # (B, L, D)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        if args.is_moe:
            self.block_sparse_moe = SparseMoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Cache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        ffn = self.block_sparse_moe if "block_sparse_moe" in self else self.mlp
        return h + ffn(self.post_attention_layernorm(h))


class MixtralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        h = self.embed_tokens(tokens)  # (B, L, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache[i])
        return self.norm(h)


class Mixtral(nn.Module):
    """Causal LM: `model(tokens (B, L), cache=None) -> logits (B, L, V)`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.kernels = "builtin"  # what the experts run on; see set_kernels
        self.offload = None  # the expert caches when experts are offloaded (mlx_mixtral.offload)
        self.memory_plan = None  # what the loader planned (mlx_mixtral.memory.plan)
        self.model_dir = None  # where the loader found it
        self.kv_bits: int | None = None  # how make_cache stores keys/values by default (None: float)
        self.kv_group_size = 64
        self.model = MixtralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        h = self.model(tokens, cache)  # (B, L, D)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)  # (B, L, V)
        return self.lm_head(h)  # (B, L, V)

    def moe_experts(self) -> list[tuple[SwitchGLU, mx.Dtype]]:
        """(experts, activation dtype) of every MoE layer in order: what the kernel choice works on.
        The experts' input is the post-attention norm's output, in that norm's dtype. An offloaded
        layer's experts are its slots, which the same kernels run on."""
        out = []
        for layer in self.layers:
            if "block_sparse_moe" in layer:
                mlp = layer.block_sparse_moe.switch_mlp
                experts = mlp.slots if isinstance(mlp, OffloadedSwitchGLU) else mlp
                out.append((experts, layer.post_attention_layernorm.weight.dtype))
        return out

    def set_kernels(self, choice: str | None = None, *, tuner=None) -> str:
        """Choose the expert kernels once for every MoE layer ("auto", "fused", "builtin"; None: the
        environment's default) and return what runs: "fused", "builtin", or "mixed" (some layers each).

        The fused kernels need a Metal GPU. There they are first probed on this machine (built,
        checked against the built-in ops, timed; metal/probe.py, results cached per chip and
        version): "fused" runs the fastest variant that passes, "auto" the fastest of those and the
        built-in ops. `tuner` (metal.probe.Tuner) replaces how the probe runs, for tests."""
        choice = kernel_choice(choice)
        if choice == "fused" and not mx.metal.is_available():
            raise OptionError("kernels='fused' needs a Metal GPU (Apple silicon); use 'auto' or 'builtin'")
        moe = self.moe_experts()
        chosen = [None] * len(moe)
        if choice != "builtin" and moe and mx.metal.is_available():
            chosen = choose_kernels(moe, self.args.num_experts_per_tok, choice, tuner)
        for (mlp, _), geometry in zip(moe, chosen):
            mlp.fused = geometry
        fused = sum(g is not None for g in chosen)
        self.kernels = "builtin" if not fused else "fused" if fused == len(moe) else "mixed"
        return self.kernels

    def make_cache(
        self, max_kv_size: int | None = None, *, kv_bits: int | None = None, kv_group_size: int | None = None
    ) -> list[Cache]:
        """One cache per layer; bounded by the model's sliding window and/or `max_kv_size`; with
        `kv_bits` (4 or 8) keys and values are stored quantized in groups of `kv_group_size`
        (None: the model's `kv_bits`/`kv_group_size`, which `load(kv_bits=...)` sets)."""
        kv_bits = self.kv_bits if kv_bits is None else kv_bits
        kv_group_size = self.kv_group_size if kv_group_size is None else kv_group_size
        check_kv_quantization(kv_bits, kv_group_size, self.args.head_dim)
        limit = kv_window(self.args.sliding_window, max_kv_size)
        if limit is None:
            return [KVCache(kv_bits, kv_group_size) for _ in self.layers]
        return [RotatingKVCache(limit, kv_bits, kv_group_size) for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize(weights, self.args)


# Parameter name fragment -> the part of the model it belongs to, first match wins (HF and mlx-lm
# names, stacked or per-expert).
_PARTS = [
    ("embed_tokens", "embedding"),
    ("switch_mlp", "experts"),
    (".experts.", "experts"),
    ("lm_head", "lm_head"),
    ("block_sparse_moe.gate", "router"),
    ("self_attn", "attention"),
    (".mlp.", "dense mlp"),
    ("norm", "norms"),
]


def weight_part(name: str) -> str:
    """Which part of the model a (checkpoint or parameter) tensor belongs to, in any of the layouts
    `sanitize` reads: embedding, experts, lm_head, router, attention, dense mlp, norms, or other."""
    name = hf_name(name)
    return next((part for fragment, part in _PARTS if fragment in name), "other")


# Mistral's native (consolidated.safetensors) names -> Hugging Face names.
_NATIVE_NAMES = [
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.block_sparse_moe\.", r"model.layers.\1.block_sparse_moe."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
]
# HF expert names: w1 = gate, w2 = down, w3 = up (the SwiGLU of the Mixtral paper).
HF_EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.(weight|scales|biases)$")


def hf_name(name: str) -> str:
    """A checkpoint tensor's Hugging Face name (Mistral-native names renamed, others as they are)."""
    for pattern, repl in _NATIVE_NAMES:
        name = re.sub(pattern, repl, name)
    return name


def _unpermute_native_qk(w: mx.array, n_heads: int) -> mx.array:
    """Native Mistral q/k rows are interleaved (x0, y0, x1, y1, ...) per head; HF stores the
    two rotary halves one after the other. Same permutation as transformers'
    convert_mistral_weights_to_hf script."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def sanitize(weights: dict[str, Any], args: ModelArgs) -> dict[str, Any]:
    """Map checkpoint names to this model's, idempotently: Mistral-native or HF names become
    HF names, and each layer's E per-expert matrices are stacked into `(E, out, in)` tensors
    under `switch_mlp.{gate,up,down}_proj` (mlx-lm's on-disk format). Handles float weights and
    quantized `weight`/`scales`/`biases` alike. Values may be any array type with stacking via mx."""
    out: dict[str, Any] = {}
    experts: dict[tuple[str, str, str], dict[int, Any]] = {}
    for name, value in weights.items():
        if "rotary_emb.inv_freq" in name:
            continue
        native = not name.startswith(("model.", "lm_head."))
        name = hf_name(name)
        if native and re.search(r"self_attn\.[qk]_proj\.weight$", name):
            heads = args.num_attention_heads if ".q_proj." in name else args.num_key_value_heads
            value = _unpermute_native_qk(value, heads)
        m = _EXPERT_KEY.match(name)
        if m:
            prefix, e, w, kind = m.groups()
            experts.setdefault((prefix, HF_EXPERT_NAMES[w], kind), {})[int(e)] = value
            continue
        out[name] = value
    for (prefix, proj, kind), by_expert in experts.items():
        missing = [e for e in range(args.num_local_experts) if e not in by_expert]
        if missing:
            raise WeightsError(f"checkpoint lacks expert {missing[0]} of {prefix} ({proj}.{kind})")
        out[f"{prefix}.switch_mlp.{proj}.{kind}"] = mx.stack([by_expert[e] for e in range(args.num_local_experts)])
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
