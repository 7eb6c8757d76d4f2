"""The converter's output against others' answers: transformers' logits (float conversion),
mlx-lm's loader (same logits from our files) and converter (same tensors), float64 KL ordering."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers.tiny_models import add_tokenizer, load_hf_model, make_hf_checkpoint

from mlx_mixtral import load_model
from mlx_mixtral.convert import convert

# intermediate 128 splits into whole groups of 32, 64 and 128, so every expert gets quantized.
SHAPE = dict(intermediate_size=128)
IDS = np.random.default_rng(7).integers(0, 128, (2, 24))
REL_TOL = 2e-5  # float32 forward passes agree to ~1e-6 relative (as in test_model_parity)


@pytest.fixture(scope="module")
def hf_single(tmp_path_factory):
    return add_tokenizer(make_hf_checkpoint(tmp_path_factory.mktemp("single"), **SHAPE))


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    """The same weights (same seed) saved by transformers in many ~100 KB shards."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("sharded"), max_shard_size="100KB", **SHAPE)


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        out.update(
            {k: np.asarray(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in mx.load(str(f)).items()}
        )
    return out


def logits(model_dir: Path) -> np.ndarray:
    return np.asarray(load_model(model_dir)(mx.array(IDS)), dtype=np.float64)


def mlx_lm_logits(model_dir: Path) -> np.ndarray:
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(Path(model_dir))
    return np.asarray(model(mx.array(IDS)).astype(mx.float32), dtype=np.float64)


def transformers_logits(hf_dir: Path) -> np.ndarray:
    with torch.no_grad():
        return load_hf_model(hf_dir)(torch.tensor(IDS)).logits.double().numpy()


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(ref_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p_float || p_quantized) of the next-token distributions, in float64."""
    p, q = log_softmax(ref_logits), log_softmax(q_logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_unquantized_equals_transformers_and_loads_in_mlx_lm(tmp_path, layout, hf_single, hf_sharded):
    src = hf_single if layout == "single" else hf_sharded
    out = convert(src, tmp_path / "mlx", max_shard_size="60KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    ref = transformers_logits(src)
    ours = logits(out)
    assert rel_err(ours, ref) < REL_TOL
    assert rel_err(mlx_lm_logits(out), ref) < REL_TOL


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_loads_in_both_loaders_with_equal_logits(tmp_path, layout, bits, hf_single, hf_sharded):
    src = hf_single if layout == "single" else hf_sharded
    shard = "40KB" if layout == "sharded" else "5GB"
    out = convert(src, tmp_path / "mlx", quantize=True, q_bits=bits, max_shard_size=shard)
    ours, theirs = logits(out), mlx_lm_logits(out)
    assert rel_err(ours, theirs) < REL_TOL
    # Quantization moved the logits, but not far (a wrong layout would scramble them).
    ref = transformers_logits(src)
    assert 1e-6 < rel_err(ours, ref) < (0.05 if bits == 8 else 0.3)


def test_single_and_sharded_sources_give_identical_files(tmp_path, hf_single, hf_sharded):
    a = read_tensors(convert(hf_single, tmp_path / "a", quantize=True))
    b = read_tensors(convert(hf_sharded, tmp_path / "b", quantize=True))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


SETTINGS = [
    dict(q_bits=2, q_group_size=32),
    dict(q_bits=3, q_group_size=64),
    dict(q_bits=5, q_group_size=128),
    dict(q_bits=6, q_group_size=64),
    dict(q_bits=8, q_group_size=128),
    dict(q_mode="mxfp4"),
    dict(q_mode="mxfp8"),
    dict(q_mode="nvfp4"),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_tensors_equal_mlx_lm_converter(tmp_path, hf_single, setting):
    """mlx_lm.convert quantizes the same float weights; only the router differs (we keep it float)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    ours_dir = convert(hf_single, tmp_path / "ours", quantize=True, **setting)
    lm_setting = {"q_bits": None, "q_group_size": None, **setting}
    mlx_lm_convert(str(hf_single), str(tmp_path / "theirs"), quantize=True, **lm_setting)
    ours, theirs = read_tensors(ours_dir), read_tensors(tmp_path / "theirs")
    routers = {k for k in theirs if ".block_sparse_moe.gate." in k}
    assert set(ours) == (set(theirs) - routers) | {k.rsplit(".", 1)[0] + ".weight" for k in routers}
    for k in set(theirs) - routers:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    config = json.loads((ours_dir / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["model.layers.0.block_sparse_moe.gate"] is False
    assert rel_err(logits(ours_dir), mlx_lm_logits(ours_dir)) < REL_TOL


def test_kl_divergence_orders_8_4_3_bits(tmp_path, hf_single):
    ref = logits(hf_single)
    kls = {b: kl(ref, logits(convert(hf_single, tmp_path / f"q{b}", quantize=True, q_bits=b))) for b in (8, 4, 3)}
    # Each bit removed roughly quadruples the squared weight error; demand a clear factor.
    assert 0 < 4 * kls[8] < kls[4] and 2 * kls[4] < kls[3], kls


@pytest.mark.parametrize("recipe, low", [("mixed_3_4", 3), ("mixed_3_6", 3), ("mixed_3_6_attn", 3)])
def test_recipes_beat_their_low_bits_and_load_in_both(tmp_path, hf_single, recipe, low):
    ref = logits(hf_single)
    out = convert(hf_single, tmp_path / recipe, recipe=recipe)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert q["bits"] == low and q["model.embed_tokens"]["bits"] > low and q["lm_head"]["bits"] > low
    assert q["model.layers.0.block_sparse_moe.gate"] is False
    assert q["model.layers.0.self_attn.v_proj"]["bits"] > low  # first layer: sensitive
    uniform = convert(hf_single, tmp_path / "uniform", quantize=True, q_bits=low)
    assert kl(ref, logits(out)) < kl(ref, logits(uniform))
    assert rel_err(logits(out), mlx_lm_logits(out)) < REL_TOL


@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=True), dict(dense=True)], ids=["tied", "dense"])
def test_tied_embeddings_and_dense_mistral(tmp_path, overrides):
    src = make_hf_checkpoint(tmp_path / "hf", **SHAPE, **overrides)
    ref = transformers_logits(src)
    assert rel_err(logits(convert(src, tmp_path / "f32")), ref) < REL_TOL
    out = convert(src, tmp_path / "q", recipe="mixed_4_6")
    assert json.loads((out / "config.json").read_text())["quantization"]["model.embed_tokens"]["bits"] == 6
    assert rel_err(logits(out), mlx_lm_logits(out)) < REL_TOL
    assert rel_err(logits(out), ref) < 0.3


def test_dtype_casts_everything_not_quantized(tmp_path, hf_single):
    out = convert(hf_single, tmp_path / "bf16", quantize=True, dtype="bfloat16")
    tensors = {k: v for f in out.glob("model*.safetensors") for k, v in mx.load(str(f)).items()}
    assert tensors["model.norm.weight"].dtype == mx.bfloat16
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].dtype == mx.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert tensors["model.layers.0.block_sparse_moe.switch_mlp.up_proj.weight"].dtype == mx.uint32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert rel_err(logits(out), transformers_logits(hf_single)) < 0.3


def test_mlx_sources_reshard_requantize_dequantize(tmp_path, hf_single):
    q4 = convert(hf_single, tmp_path / "q4", recipe="mixed_3_6")
    src = read_tensors(q4)

    resharded = convert(q4, tmp_path / "resharded", max_shard_size="30KB")
    assert len(list(resharded.glob("model-*.safetensors"))) > 2
    assert (
        json.loads((resharded / "config.json").read_text())["quantization"]
        == json.loads((q4 / "config.json").read_text())["quantization"]
    )
    again = read_tensors(resharded)
    assert again.keys() == src.keys()
    for k in src:
        np.testing.assert_array_equal(again[k], src[k], err_msg=k)

    deq = convert(q4, tmp_path / "deq", dequantize=True)
    assert "quantization" not in json.loads((deq / "config.json").read_text())
    w = read_tensors(deq)["model.layers.1.self_attn.v_proj.weight"]
    p = "model.layers.1.self_attn.v_proj"
    expected = mx.dequantize(
        mx.array(src[p + ".weight"]), mx.array(src[p + ".scales"]), mx.array(src[p + ".biases"]), group_size=64, bits=6
    )
    np.testing.assert_array_equal(w, np.asarray(expected))
    assert rel_err(logits(deq), logits(q4)) < REL_TOL

    q8 = convert(q4, tmp_path / "q8", quantize=True, q_bits=8)
    assert json.loads((q8 / "config.json").read_text())["quantization"]["bits"] == 8
    assert rel_err(logits(q8), logits(q4)) < 0.05
    assert rel_err(logits(q8), mlx_lm_logits(q8)) < REL_TOL


def _hf_to_native(hf_dir: Path, out_dir: Path) -> Path:
    """Mistral's native layout of the same weights, built independently of the converter.

    transformers' Mistral conversion script turns native q/k rows into HF order with
    `w.view(n_heads, dim // n_heads // 2, 2, in).transpose(1, 2)`; this is its inverse.
    """
    from safetensors.torch import load_file, save_file

    config = json.loads((hf_dir / "config.json").read_text())
    heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
    names = [
        ("model.embed_tokens.", "tok_embeddings."),
        ("model.norm.", "norm."),
        ("lm_head.", "output."),
        (".self_attn.q_proj.", ".attention.wq."),
        (".self_attn.k_proj.", ".attention.wk."),
        (".self_attn.v_proj.", ".attention.wv."),
        (".self_attn.o_proj.", ".attention.wo."),
        (".input_layernorm.", ".attention_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
        ("model.layers.", "layers."),
    ]
    native = {}
    for name, w in load_file(hf_dir / "model.safetensors").items():
        for proj, n in heads.items():
            if f"self_attn.{proj}_proj" in name:
                out_dim, in_dim = w.shape
                w = w.view(n, 2, out_dim // n // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
        for a, b in names:
            name = name.replace(a, b)
        native[name] = w.contiguous()
    out_dir.mkdir()
    save_file(native, out_dir / "consolidated.safetensors")
    params = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "head_dim": config["hidden_size"] // config["num_attention_heads"],
        "hidden_dim": config["intermediate_size"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config["num_key_value_heads"],
        "norm_eps": config["rms_norm_eps"],
        "vocab_size": config["vocab_size"],
        "rope_theta": 1e6,
        "moe": {"num_experts": config["num_local_experts"], "num_experts_per_tok": config["num_experts_per_tok"]},
    }
    (out_dir / "params.json").write_text(json.dumps(params))
    return out_dir


@pytest.mark.parametrize("quantize", [False, True])
def test_mistral_native_layout_converts_to_the_same_tensors(tmp_path, hf_single, quantize):
    native = _hf_to_native(hf_single, tmp_path / "native")
    assert any("block_sparse_moe.experts.3.w2" in k for k in mx.load(str(native / "consolidated.safetensors")))
    a = read_tensors(convert(hf_single, tmp_path / "from_hf", quantize=quantize))
    b_dir = convert(native, tmp_path / "from_native", quantize=quantize)
    b = read_tensors(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    if not quantize:
        assert rel_err(logits(b_dir), transformers_logits(hf_single)) < REL_TOL


def test_recipe_layers_follow_llama_cpp_q4_k_m_split():
    """llama.cpp's Q4_K_M gives extra bits to layer i when i < n/8, i >= 7n/8 or (i - n/8) % 3 == 2."""
    from mlx_mixtral.convert.quant import make_plan

    n = 32
    plan = make_plan(None, 64, "affine", "mixed_3_6", n)
    for i in range(n):
        reference = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
        v = plan.for_module(f"model.layers.{i}.self_attn.v_proj", 4096)
        down = plan.for_module(f"model.layers.{i}.block_sparse_moe.switch_mlp.down_proj", 14336)
        up = plan.for_module(f"model.layers.{i}.block_sparse_moe.switch_mlp.up_proj", 4096)
        assert (v["bits"], down["bits"], up["bits"]) == ((6, 6, 3) if reference else (3, 3, 3)), i
        assert plan.for_module(f"model.layers.{i}.block_sparse_moe.gate", 4096) is False
    assert plan.for_module("lm_head", 4096)["bits"] == 6 and plan.for_module("model.embed_tokens", 4096)["bits"] == 6
