"""Logits of this package's Mixtral/Mistral against transformers on the same checkpoint (float32)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers.tiny_models import load_hf_model, make_hf_checkpoint

from mlx_mixtral import load_model

# Float32 forward passes through a few layers agree to ~1e-6 relative; a wrong RoPE layout,
# mask or routing rule shows up as errors of 1e-1 or more.
REL_TOL = 2e-5

CONFIGS = {
    "k2_kv2": dict(num_key_value_heads=2, num_experts_per_tok=2, num_local_experts=4),
    "k3_kv1_window": dict(num_key_value_heads=1, num_experts_per_tok=3, num_local_experts=5, sliding_window=7),
    "k2_kv4_tied_headdim": dict(num_key_value_heads=4, num_local_experts=8, tie_word_embeddings=True, head_dim=24),
    "k1_of_2_rope1e4": dict(num_key_value_heads=2, num_experts_per_tok=1, num_local_experts=2, rope_theta=1e4),
}


def _reference(path, ids):
    with torch.no_grad():
        return load_hf_model(path)(torch.tensor(ids)).logits.double().numpy()


def _rel_err(out, ref):
    return float(np.abs(np.asarray(out, dtype=np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mixtral_logits_match_transformers(tmp_path, name):
    path = make_hf_checkpoint(tmp_path, **CONFIGS[name])
    ids = np.random.default_rng(1).integers(0, 128, (2, 40))  # batch 2, longer than the window
    ref = _reference(path, ids)
    out = load_model(path)(mx.array(ids))
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < REL_TOL


def test_sorted_prefill_path_matches_transformers(tmp_path):
    """Enough tokens that (token, slot) pairs are sorted by expert before the gathered matmuls."""
    from mlx_mixtral.experts import SORT_MIN_PAIRS

    path = make_hf_checkpoint(tmp_path, num_local_experts=8, num_experts_per_tok=2)
    ids = np.random.default_rng(2).integers(0, 128, (1, SORT_MIN_PAIRS + 37))
    assert _rel_err(load_model(path)(mx.array(ids)), _reference(path, ids)) < REL_TOL


@pytest.mark.parametrize("window", [None, 5])
def test_dense_mistral_logits_match_transformers(tmp_path, window):
    path = make_hf_checkpoint(tmp_path, dense=True, sliding_window=window)
    ids = np.random.default_rng(3).integers(0, 128, (2, 23))
    assert _rel_err(load_model(path)(mx.array(ids)), _reference(path, ids)) < REL_TOL


def test_bfloat16_checkpoint_runs_in_float32_on_cpu(tmp_path):
    """A bf16 hub checkpoint loads on the CPU backend (gather_mm there is float32-only)."""
    path = make_hf_checkpoint(tmp_path, dtype="bfloat16")
    model = load_model(path)
    ids = np.random.default_rng(4).integers(0, 128, (1, 12))
    ref = _reference(path, ids)  # transformers upcasts the same bf16 weights to float32
    assert _rel_err(model(mx.array(ids)), ref) < REL_TOL


def test_half_precision_model_on_cpu_falls_back_to_float32_experts(tmp_path):
    path = make_hf_checkpoint(tmp_path)
    model = load_model(path, dtype=mx.bfloat16)
    ids = np.random.default_rng(5).integers(0, 128, (1, 9))
    # bf16 activations round at ~4e-3; routing is the same, so errors stay at that level.
    assert _rel_err(model(mx.array(ids)).astype(mx.float32), _reference(path, ids)) < 5e-2
