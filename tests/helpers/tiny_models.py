"""Tiny real Hugging Face checkpoints for tests, written by transformers itself."""

from __future__ import annotations

from pathlib import Path

TINY_MIXTRAL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
)
TINY_MISTRAL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def mistral_tokenizer_path(version: str = "v1") -> Path:
    """The real Mixtral-8x7B (v1) or 8x22B (v3) SentencePiece model shipped in mistral-common."""
    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    names = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}
    return data / names[version]


def make_hf_checkpoint(
    path: Path,
    *,
    dense: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Save a randomly initialised MixtralForCausalLM (or MistralForCausalLM) in hub format."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    if dense:
        config, cls = MistralConfig(**{**TINY_MISTRAL, **overrides}), MistralForCausalLM
    else:
        config, cls = MixtralConfig(**{**TINY_MIXTRAL, **overrides}), MixtralForCausalLM
    model = cls(config).to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def load_hf_model(path: Path):
    """The transformers model of a checkpoint directory, in float32, for reference logits."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def add_tokenizer(path: Path, version: str = "v1") -> Path:
    """Copy the real Mistral SentencePiece tokenizer into a checkpoint dir as tokenizer.model."""
    import shutil

    shutil.copy(mistral_tokenizer_path(version), Path(path) / "tokenizer.model")
    return Path(path)
