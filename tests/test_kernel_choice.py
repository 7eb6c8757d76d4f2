"""The expert-kernel choice is a value the model holds, decided once, not an environment lookup per call."""

import mlx.core as mx
import pytest

from mlx_mixtral import load, load_model
from mlx_mixtral.errors import KernelFallbackWarning, OptionError
from mlx_mixtral.experts import KERNELS_ENV, kernel_choice


def _fused_flags(model):
    return {layer.block_sparse_moe.switch_mlp.fused is not None for layer in model.layers}


def test_choice_comes_from_load_then_the_environment(tiny_hf_dir, monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert kernel_choice() == "auto"
    for raw, expected in [("0", "builtin"), ("1", "auto"), ("builtin", "builtin"), ("FUSED", "fused")]:
        monkeypatch.setenv(KERNELS_ENV, raw)
        assert kernel_choice() == expected
    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(OptionError, match=f"{KERNELS_ENV}='fast': expected one of auto, fused, builtin"):
        load(tiny_hf_dir)  # refused before anything is read
    with pytest.raises(OptionError, match="kernels='gpu'"):
        load(tiny_hf_dir, kernels="gpu")
    model = load_model(tiny_hf_dir, kernels="auto")  # an explicit choice wins over the environment
    assert model.kernels == "builtin" and _fused_flags(model) == {False}  # no Metal GPU here


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the refusal on a machine without Metal")
def test_fused_needs_metal(tiny_hf_dir):
    with pytest.raises(OptionError, match="needs a Metal GPU"):
        load_model(tiny_hf_dir, kernels="fused")


def test_switching_on_the_model_not_the_process(tiny_hf_dir, monkeypatch):
    """A/B runs switch the model: every MoE layer follows, and the environment is not read again."""
    monkeypatch.setenv(KERNELS_ENV, "builtin")
    model = load_model(tiny_hf_dir)
    assert model.kernels == "builtin" and _fused_flags(model) == {False}
    monkeypatch.setenv(KERNELS_ENV, "fused")  # too late: the choice was made at load
    assert _fused_flags(model) == {False}
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)  # as on a Mac, from here on
    # float32 experts: not what the kernels take, so even on a Mac they stay on the built-in ops
    # (the probe that decides for quantized ones: tests/test_kernel_probe.py)
    assert model.set_kernels("auto") == "builtin" and _fused_flags(model) == {False}
    with pytest.warns(KernelFallbackWarning, match="2 of 2 MoE layers are quantized in a way"):
        assert model.set_kernels("fused") == "builtin"
