"""Loading MLX dirs written by mlx-lm, HF dirs and hub-cache ids; every bad input's message."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint
from mlx.utils import tree_flatten, tree_map

from mlx_mixtral import LoadError, load_model
from mlx_mixtral import loader as loader_mod
from mlx_mixtral.experts import QuantizedSwitchLinear
from mlx_mixtral.loader import load_planned_model
from mlx_mixtral.memory.budget import Budget, gpu_working_set

IDS = mx.array(np.random.default_rng(0).integers(0, 128, (2, 70)))  # 280 pairs: the sorted path


def _mlx_lm_convert(src, dst, **kwargs):
    from mlx_lm.convert import convert

    convert(str(src), str(dst), **kwargs)
    return Path(dst)


def _mlx_lm_logits_float32(path):
    """mlx-lm's own Mixtral on the same dir, its floats upcast so both sides do float32 math."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(Path(path))
    model.update(
        tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters())
    )
    return model(IDS)


@pytest.fixture(scope="module")
def hf_with_tokenizer(tmp_path_factory):
    return add_tokenizer(make_hf_checkpoint(tmp_path_factory.mktemp("hf")))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(q_bits=4, q_group_size=64),
        dict(q_bits=8, q_group_size=32),
        dict(q_bits=4, q_group_size=32, quant_predicate="mixed_3_6"),  # per-module overrides
        dict(q_mode="mxfp4"),
        dict(q_bits=4, q_group_size=64, dtype="bfloat16"),  # what hub models look like
    ],
)
def test_mlx_lm_converted_dirs_match_mlx_lm_logits(tmp_path, hf_with_tokenizer, kwargs):
    dst = _mlx_lm_convert(hf_with_tokenizer, tmp_path / "mlx", quantize=True, **{"dtype": "float32", **kwargs})
    ours = load_model(dst)
    assert isinstance(ours.layers[0].block_sparse_moe.switch_mlp.gate_proj, QuantizedSwitchLinear)
    ref = _mlx_lm_logits_float32(dst)
    err = float(mx.abs(ours(IDS) - ref).max() / mx.abs(ref).max())
    assert err < 1e-5


def test_mixed_precision_bits_follow_config(tmp_path, hf_with_tokenizer):
    dst = _mlx_lm_convert(
        hf_with_tokenizer,
        tmp_path / "mlx",
        quantize=True,
        q_group_size=32,
        quant_predicate="mixed_3_6",
        dtype="float32",
    )
    overrides = json.loads((dst / "config.json").read_text())["quantization"]
    model = load_model(dst)
    for path, module in model.named_modules():
        if isinstance(overrides.get(path), dict):
            assert (module.bits, module.group_size) == (overrides[path]["bits"], overrides[path]["group_size"])


def test_float32_on_cpu_for_bf16_scales(tmp_path, hf_with_tokenizer):
    dst = _mlx_lm_convert(hf_with_tokenizer, tmp_path / "mlx", quantize=True, dtype="bfloat16")
    model = load_model(dst)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.float32, mx.uint32}
    assert load_model(dst, dtype=mx.bfloat16).layers[0].input_layernorm.weight.dtype == mx.bfloat16


# ---- bad inputs: one line naming the file and tensor -------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    weights, meta = mx.load(str(path), return_metadata=True)
    edit(weights)
    mx.save_safetensors(str(path), weights, metadata=meta)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_bad"))


def _expect(path, pattern):
    with pytest.raises(LoadError, match=pattern) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_tensor(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    _rewrite(d / "model.safetensors", lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    _expect(d, r"m: missing tensor 'model.layers.1.self_attn.k_proj.weight'")


def test_missing_expert(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    _rewrite(d / "model.safetensors", lambda w: w.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    _expect(d, r"lacks expert 2 of model.layers.0.block_sparse_moe \(up_proj.weight\)")


def test_unexpected_tensor(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    _rewrite(d / "model.safetensors", lambda w: w.update({"model.layers.0.extra.weight": mx.zeros(3)}))
    _expect(d, r"model.safetensors: unexpected tensor 'model.layers.0.extra.weight'")


def test_shape_mismatch_names_file_and_tensor(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(
        d,
        r"model.safetensors: tensor 'model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight' "
        r"has shape \[4, 64, 96\], config.json implies \[4, 64, 80\]",
    )


def test_truncated_file(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _expect(d, r"model.safetensors: truncated: tensor '.+' needs bytes up to \d+ but the file has \d+")


def test_corrupt_header(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[10:20] = b"\xff" * 10
    (d / "model.safetensors").write_bytes(bytes(data))
    _expect(d, r"model.safetensors: corrupt safetensors header")


def test_index_names_missing_shard(tmp_path):
    d = make_hf_checkpoint(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    _expect(d, rf"model.safetensors.index.json: names shard '{shards[-1].name}' .* which does not exist")


def test_sharded_checkpoint_loads(tmp_path, hf_dir):
    d = make_hf_checkpoint(tmp_path / "sharded", max_shard_size="200KB")
    ids = IDS[:, :9]
    assert float(mx.abs(load_model(d)(ids) - load_model(hf_dir)(ids)).max()) == 0.0


def test_missing_config_and_weights(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    (d / "config.json").unlink()
    _expect(d, r"m: no config.json or params.json found")
    e = _copy(hf_dir, tmp_path / "e")
    (e / "model.safetensors").unlink()
    _expect(e, r"e: no model\*.safetensors or consolidated\*.safetensors weight files")


def _mac_device_info(d=None):
    """mx.device_info on a Mac whose default device is the CPU: only the GPU's has a working set."""
    if d is not None and d == mx.gpu:
        return {"device_name": "Apple M2 Max", "max_recommended_working_set_size": 1 << 36, "memory_size": 1 << 36}
    return {"device_name": "Apple M2 Max", "architecture": "arm64"}


def test_working_set_read_from_the_gpu_not_the_default_device(monkeypatch, hf_dir):
    from mlx_mixtral.bench.timing import device_name

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", _mac_device_info)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: 0)
    assert Budget.of_machine().bytes == 1 << 36  # mx.device_info()[...] raised KeyError here
    assert gpu_working_set() == 1 << 36
    load_planned_model(hf_dir)  # the memory plan and the wired limit both read it
    assert device_name() == "Apple M2 Max"
    with pytest.raises(
        LoadError, match="does not fit: .* exceed the budget of 1 KB \\(the GPU's recommended working set\\)"
    ):
        monkeypatch.setattr(mx, "device_info", lambda d=None: {"max_recommended_working_set_size": 1000})
        load_planned_model(hf_dir)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fp8", "compressed-tensors"])
def test_foreign_quantization_config_is_a_one_line_load_error(tmp_path, hf_dir, method):
    d = _copy(hf_dir, tmp_path / "q")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128, "desc_act": False}
    (d / "config.json").write_text(json.dumps(config))
    message = _expect(d, f"config.json: quantization_config has quant_method '{method}', a layout this package")
    assert "mlx-mixtral convert" in message


def test_mlx_quantization_under_either_key_loads(tmp_path, hf_dir):
    """mlx-community directories write the same MLX dict as `quantization` and `quantization_config`;
    older ones only the latter."""
    from mlx_mixtral.convert import convert

    q = convert(hf_dir, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    config = json.loads((q / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    reference = load_model(q)(IDS[:, :5])
    config["quantization_config"] = config.pop("quantization")
    (q / "config.json").write_text(json.dumps(config))
    assert mx.array_equal(load_model(q)(IDS[:, :5]), reference)


def test_wired_limit_sized_to_model_and_restored(monkeypatch, hf_dir):
    """On Metal the loader wires about the model's size and restores the old limit afterwards."""
    import gc

    calls = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", _mac_device_info)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 12345)
    model = load_model(hf_dir)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert len(calls) == 1 and weights < calls[0] < weights * 1.1 + (1 << 30) + 1
    del model
    gc.collect()
    assert calls[-1] == 12345


# ---- hub ids ------------------------------------------------------------------------------------


def _populate_hub_cache(cache_dir: Path, repo: str, src: Path) -> None:
    """Lay out a hub cache entry exactly as huggingface-hub writes it (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache_dir / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(src, root / "snapshots" / commit)


def test_hub_id_offline_from_cache(tmp_path, monkeypatch, hf_dir):
    _populate_hub_cache(tmp_path / "hub", "tiny-org/tiny-mixtral", hf_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    resolved = loader_mod.resolve_model_dir("tiny-org/tiny-mixtral")
    assert (resolved / "model.safetensors").is_file()
    ids = IDS[:, :5]
    assert float(mx.abs(load_model(resolved)(ids) - load_model(hf_dir)(ids)).max()) == 0.0
    with pytest.raises(LoadError, match="tiny-org/missing: not in the local hub cache and HF_HUB_OFFLINE is set"):
        loader_mod.resolve_model_dir("tiny-org/missing")


def test_not_a_dir_nor_repo_id():
    with pytest.raises(LoadError, match="^/no/such/dir/at/all: no such directory$"):
        loader_mod.resolve_model_dir("/no/such/dir/at/all")
    with pytest.raises(LoadError, match="no such directory, and not a hub id"):
        loader_mod.resolve_model_dir("a/b/c")
