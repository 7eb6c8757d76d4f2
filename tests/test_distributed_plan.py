"""The shard plan, slice reads and name mapping of the sharded loader, in one process (no launch)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mixtral import LoadError, Mixtral, ModelArgs
from mlx_mixtral.distributed.loader import read_slice, source_tensors
from mlx_mixtral.distributed.sharding import even_split, plan_shards
from mlx_mixtral.errors import ShardError
from mlx_mixtral.weights import read_header

MIXTRAL_8X7B = dict(
    model_type="mixtral",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=32000,
)


def _shapes(config: dict, group_size: int | None = 64, bits: int = 4) -> tuple[ModelArgs, dict]:
    """Stored shapes of a (lazily built, never evaluated) model, quantized like a checkpoint."""
    args = ModelArgs.from_dict(config)
    model = Mixtral(args)
    if group_size:
        nn.quantize(model, group_size, bits)
    return args, {k: v.shape for k, v in tree_flatten(model.parameters())}


def take(array: mx.array, spec: tuple[int, int, int] | None) -> mx.array:
    """The part of a whole tensor that `ShardPlan.slice_of` names, cut in memory."""
    if spec is None:
        return array
    axis, start, stop = spec
    return array[..., start:stop, :] if axis == -2 else array[..., start:stop]


def test_even_split():
    assert even_split(8, 3) == (3, 3, 2)
    assert even_split(224, 3) == (75, 75, 74)
    assert even_split(4, 4) == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "size, kv, ffn",
    [
        (2, (4, 4), (7168, 7168)),
        (3, (3, 3, 2), (75 * 64, 75 * 64, 74 * 64)),  # uneven: whole groups of 64
        (8, (1,) * 8, (28 * 64,) * 8),
    ],
)
def test_mixtral_8x7b_4bit_plan(size, kv, ffn):
    args, shapes = _shapes(MIXTRAL_8X7B)
    plan = plan_shards(args, size, shapes)
    assert plan.kv_heads == kv and plan.ffn == ffn
    # Every rank's stored slices tile the full tensors exactly.
    for name in (
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.o_proj.scales",
        "model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight",
        "model.layers.0.block_sparse_moe.switch_mlp.down_proj.biases",
        "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight",
        "model.layers.0.self_attn.q_proj.scales",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        specs = [plan.slice_of(name, shapes[name], r) for r in range(size)]
        axis = specs[0][0]
        assert all(s[0] == axis for s in specs)
        assert [s[1] for s in specs[1:]] == [s[2] for s in specs[:-1]]
        assert specs[0][1] == 0 and specs[-1][2] == shapes[name][axis]
    # o_proj keeps exactly the input columns of the query heads whose KV heads this rank owns.
    q = plan.element_range("model.layers.1.self_attn.o_proj.weight", size - 1)
    assert q == (-1, (32 - kv[-1] * 4) * 128, 32 * 128)
    # The router, norms and embeddings stay whole.
    for name in (
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.embed_tokens.weight",
        "lm_head.scales",
        "model.layers.0.input_layernorm.weight",
    ):
        assert plan.slice_of(name, shapes[name], 1) is None


def test_fewer_kv_heads_than_ranks_replicates_attention():
    args, shapes = _shapes(MIXTRAL_8X7B)
    plan = plan_shards(args, 16, shapes)
    assert plan.kv_heads is None and "8 KV heads for 16 ranks" in plan.note
    assert (
        plan.slice_of("model.layers.0.self_attn.o_proj.weight", shapes["model.layers.0.self_attn.o_proj.weight"], 3)
        is None
    )


def test_head_boundaries_off_quantization_groups_replicate_attention():
    # 4 KV heads of 16 dims, 1 query head each: rank cuts at 16-input steps, groups are 64 wide.
    config = dict(MIXTRAL_8X7B, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)
    args, shapes = _shapes(config, group_size=64)
    plan = plan_shards(args, 2, shapes)
    assert plan.kv_heads is None
    args, shapes = _shapes(config, group_size=32)  # groups of 32 meet the head boundary at 32
    assert plan_shards(args, 2, shapes).kv_heads == (2, 2)


def test_too_few_groups_is_refused_with_one_line():
    args, shapes = _shapes(
        dict(MIXTRAL_8X7B, hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128)
    )
    with pytest.raises(
        ShardError,
        match=r"^intermediate_size=128 has only 2 quantization groups of 64; "
        r"cannot give each of 3 ranks a part",
    ):
        plan_shards(args, 3, shapes)
    args, shapes = _shapes(
        dict(MIXTRAL_8X7B, hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128),
        group_size=None,
    )
    assert plan_shards(args, 3, shapes).ffn == (43, 43, 42)  # float weights split at any column


def test_unquantized_plan_splits_anywhere():
    args, shapes = _shapes(dict(MIXTRAL_8X7B, intermediate_size=1000), group_size=None)
    assert plan_shards(args, 3, shapes).ffn == (334, 333, 333)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.uint32, mx.float16])
def test_read_slice_reads_the_same_values_as_slicing_the_whole_tensor(tmp_path, dtype, monkeypatch):
    import mlx_mixtral.distributed.loader as shard_loader

    rng = np.random.default_rng(0)
    full = mx.array(rng.integers(0, 2**31, (3, 37, 29)).astype(np.uint32))
    full = full if dtype == mx.uint32 else mx.array(rng.standard_normal((3, 37, 29)).astype(np.float32)).astype(dtype)
    mx.save_safetensors(str(tmp_path / "t.safetensors"), {"x": full, "y": full[1]})
    info = read_header(tmp_path / "t.safetensors")
    monkeypatch.setattr(shard_loader, "READ_BLOCK_BYTES", 5 * 29 * 4)  # several row blocks per expert
    for name, arr in (("x", full), ("y", full[1])):
        assert mx.array_equal(read_slice(info[name], None), arr)
        for spec in ((-2, 5, 19), (-1, 3, 17), (-1, 0, 29), (-2, 36, 37)):
            got = read_slice(info[name], spec)
            assert got.dtype == dtype
            assert mx.array_equal(got, take(arr, spec)), (name, spec)


def test_source_tensors_maps_hf_experts_in_order(tiny_hf_dir):
    from mlx_mixtral.weights import find_weight_files, read_headers

    args = ModelArgs.from_dict(json.loads((tiny_hf_dir / "config.json").read_text()))
    sources = source_tensors(read_headers(find_weight_files(tiny_hf_dir)), args, tiny_hf_dir)
    assert sources["model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"] == [
        f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)
    ]
    assert sources["model.layers.0.self_attn.q_proj.weight"] == ["model.layers.0.self_attn.q_proj.weight"]
    assert sources["lm_head.weight"] == ["lm_head.weight"]


def test_native_layout_is_refused_clearly(tmp_path):
    from mlx_mixtral.distributed.loader import load_sharded

    (tmp_path / "params.json").write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 1,
                "n_heads": 4,
                "n_kv_heads": 2,
                "hidden_dim": 96,
                "vocab_size": 128,
                "norm_eps": 1e-5,
            }
        )
    )
    mx.save_safetensors(
        str(tmp_path / "consolidated.safetensors"), {"layers.0.attention.wq.weight": mx.zeros((64, 64))}
    )
    with pytest.raises(LoadError, match=r"Mistral-native tensor names .*convert it first with `mlx-mixtral convert`"):
        load_sharded(tmp_path, mx.distributed.init())  # a group of one: no launch needed


def test_group_of_one_loads_a_single_expert_hf_checkpoint_like_load_model(tmp_path):
    """Per-expert HF tensors are stacked to (E, out, in) even when E = 1."""
    from helpers.tiny_models import make_hf_checkpoint

    from mlx_mixtral import load_model
    from mlx_mixtral.distributed.loader import load_sharded

    model_dir = make_hf_checkpoint(tmp_path / "e1", seed=6, num_local_experts=1, num_experts_per_tok=1)
    tokens = mx.array([[1, 17, 93, 5]])
    got = load_sharded(model_dir, mx.distributed.init())(tokens)  # (1, 4, V)
    assert mx.allclose(got, load_model(model_dir)(tokens), rtol=1e-5, atol=1e-6)
