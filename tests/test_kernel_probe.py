"""The load-time kernel probe: every variant built at both buffer kinds, faulty kernels rejected with
one warning line, the fastest survivor chosen, results kept in the decision cache; on a Mac, the real
kernels. Off a Mac the launcher is injected: the pure-MLX twins stand in for correct kernels."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_mixtral.config import ModelArgs
from mlx_mixtral.errors import KernelFallbackWarning
from mlx_mixtral.experts import FUSED_MAX_PAIRS, SwitchGLU
from mlx_mixtral.metal import decisions, probe
from mlx_mixtral.metal.decisions import DecisionCache
from mlx_mixtral.metal.kernels import ROW_VARIANTS, Launcher, plan_layer
from mlx_mixtral.metal.probe import (
    CONSTANT_BELOW,
    ProbeResult,
    Tuner,
    choose_kernels,
    pipelined_seconds,
    probe_layer,
    probe_token_counts,
)
from mlx_mixtral.metal.reference import TWINS, down_reference, gate_up_reference
from mlx_mixtral.model import Mixtral

on_metal = pytest.mark.skipif(not mx.metal.is_available(), reason="needs a Metal GPU")


def _switch_glu(hidden=128, ffn=96, experts=4, dtype=mx.float32, group_size=32, bits=4, seed=0):
    mx.random.seed(seed)
    mlp = SwitchGLU(hidden, ffn, experts)
    mlp.set_dtype(dtype)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, getattr(mlp, name).to_quantized(group_size, bits))
    mx.eval(mlp.parameters())
    return mlp


def _fake_timer(us: dict[str, float], calls: list | None = None):
    """Seconds per call from a table by label ("builtin", "fused R=2"), nothing run."""

    def timer(label, fn):
        if calls is not None:
            calls.append(label)
        return us[label] * 1e-6

    return timer


FAST_R2 = {"builtin": 30.0, "fused R=1": 20.0, "fused R=2": 10.0, "fused R=4": 15.0}


def _tuner(tmp_path=None, launcher=TWINS, us=FAST_R2, calls=None) -> Tuner:
    cache = DecisionCache(tmp_path / "probe.json") if tmp_path is not None else None
    return Tuner(launcher=launcher, timer=_fake_timer(us, calls), cache=cache, device=mx.cpu, chip="Test M0")


class Recording:
    """A launcher that runs the twins and records (rows per simdgroup, pair count) of every gate_up call."""

    def __init__(self, gate_up=gate_up_reference):
        self.calls: list[tuple[int, int]] = []
        self._gate_up = gate_up
        self.launcher = Launcher(self.gate_up, down_reference)

    def gate_up(self, x, ids, gate, up, geometry):
        self.calls.append((geometry.rows_per_simdgroup, ids.size))
        return self._gate_up(x, ids, gate, up, geometry)


def _fails_at_eval(x, ids, gate, up, geometry):
    """Like a Metal compile error, the failure surfaces only when the graph is evaluated: the CPU
    backend's gather_mm refuses bfloat16 at evaluation ("[GatherMM::eval] ...")."""
    w = mx.zeros((geometry.experts, geometry.hidden, geometry.ffn), dtype=mx.bfloat16)
    pair_x = x.astype(mx.bfloat16)[mx.arange(ids.size) // geometry.top_k][:, None, :]  # (P, 1, D)
    return mx.gather_mm(pair_x, w, rhs_indices=ids).squeeze(1).astype(geometry.dtype)  # (P, F)


def _wrong(x, ids, gate, up, geometry):
    return gate_up_reference(x, ids, gate, up, geometry) * 1.5


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, KernelFallbackWarning)]


# ---------------------------------------------------------------- both buffer kinds, every variant


@pytest.mark.parametrize("top_k", range(1, FUSED_MAX_PAIRS + 2))
def test_probe_pair_counts_cover_both_buffer_kinds(top_k):
    pairs = [t * top_k for t in probe_token_counts(top_k)]
    if top_k > FUSED_MAX_PAIRS:
        assert pairs == []  # the fused path never runs such a layer
        return
    assert max(pairs) <= FUSED_MAX_PAIRS and pairs[0] == top_k  # one decode token first
    kinds = {p < CONSTANT_BELOW for p in pairs}  # constant buffers below 8 elements, device from 8
    assert kinds == ({True, False} if top_k < CONSTANT_BELOW else {False})


def test_every_variant_runs_at_both_buffer_kinds_before_it_is_chosen():
    rec = Recording()
    mlp = _switch_glu()
    result = probe_layer(mlp, mx.float32, 2, _tuner(launcher=rec.launcher))
    assert {r for r, _ in rec.calls} == set(ROW_VARIANTS)
    for r in ROW_VARIANTS:
        pairs = {p for rr, p in rec.calls if rr == r}
        assert min(pairs) < CONSTANT_BELOW <= max(pairs) <= FUSED_MAX_PAIRS, (r, pairs)
    assert [v.error for v in result.variants] == [None, None, None]
    assert all(v.max_error == 0.0 for v in result.variants)  # float32 twins equal the built-in ops


# ---------------------------------------------------------------- rejection


def test_kernel_failing_at_evaluation_falls_back_with_one_warning():
    mlp = _switch_glu()
    tuner = _tuner(launcher=Launcher(_fails_at_eval, down_reference))
    chosen, caught = _caught(lambda: choose_kernels([(mlp, mx.float32)] * 3, 2, "fused", tuner))
    assert chosen == [None, None, None]  # built-in ops, even when fused was asked for
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and len(message) < 400
    assert "R=1, R=2, R=4 rejected for 3 MoE layers (float32/g32/4bit/down:g32/4bit/D128/F96/E4/K2)" in message
    assert "failed to build or run (RuntimeError: [GatherMM::eval]" in message
    assert message.endswith("they run MLX's built-in ops")


def test_wrong_numbers_are_rejected():
    mlp = _switch_glu()
    result = probe_layer(mlp, mx.float32, 2, _tuner(launcher=Launcher(_wrong, down_reference)))
    assert all(v.error.startswith("wrong numbers") for v in result.variants)
    assert all(v.max_error > 0.1 and v.us is None for v in result.variants)  # rejected ones are not timed
    assert result.choose("fused") is None and result.choose("auto") is None


def test_a_rejected_variant_leaves_the_others():
    def gate_up(x, ids, gate, up, geometry):
        if geometry.rows_per_simdgroup == 2:  # the fastest on the fake clock, but broken
            return _fails_at_eval(x, ids, gate, up, geometry)
        return gate_up_reference(x, ids, gate, up, geometry)

    mlp = _switch_glu()
    chosen, caught = _caught(
        lambda: choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(launcher=Launcher(gate_up, down_reference)))
    )
    assert chosen[0].rows_per_simdgroup == 4  # the fastest survivor
    assert len(caught) == 1 and str(caught[0].message).endswith("it runs the fused R=4 variant")


def test_bfloat16_agreement_is_the_shared_tolerance():
    """The twins agree with the built-in ops within FALLBACK_AGREEMENT (bfloat16 rounds differently)."""
    mlp = _switch_glu(dtype=mx.bfloat16)
    result = probe_layer(mlp, mx.bfloat16, 2, _tuner())
    assert result.tolerance == probe.FALLBACK_AGREEMENT["bfloat16"]
    assert all(v.error is None and 0 < v.max_error <= result.tolerance for v in result.variants)


# ---------------------------------------------------------------- timing and the choice


def test_fastest_variant_chosen_and_auto_weighs_the_builtin_ops():
    mlp = _switch_glu()
    calls = []
    assert choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(calls=calls))[0].rows_per_simdgroup == 2
    assert sorted(calls) == sorted(["builtin", "fused R=1", "fused R=2", "fused R=4"])  # each timed once
    slow = {"builtin": 5.0, "fused R=1": 20.0, "fused R=2": 10.0, "fused R=4": 15.0}
    assert choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(us=slow)) == [None]  # built-in is faster
    assert choose_kernels([(mlp, mx.float32)], 2, "fused", _tuner(us=slow))[0].rows_per_simdgroup == 2


def test_pipelined_timing_queues_every_call_before_one_wait(monkeypatch):
    """Per-call time = (end - start) / iters of queued calls, best round; async_eval once per call."""
    queued = []
    monkeypatch.setattr(mx, "async_eval", lambda *a: queued.append(a))
    ticks = iter([0.0, 8.0, 10.0, 14.0, 20.0, 30.0])  # rounds of 8, 4 and 10 seconds
    seconds = pipelined_seconds(lambda: mx.zeros(3), iters=4, rounds=3, clock=lambda: next(ticks))
    assert seconds == 1.0 and len(queued) == 12


def test_real_timer_runs_on_the_twins():
    result = probe_layer(_switch_glu(), mx.float32, 2, replace(_tuner(), timer=probe._pipelined))
    assert result.builtin_us > 0 and all(v.us > 0 for v in result.variants)


# ---------------------------------------------------------------- the model: one probe per geometry


def _mixed_model():
    """Four MoE layers: two 4-bit, one 8-bit, one 3-bit (which the kernels do not build)."""
    args = ModelArgs.from_dict(
        {
            "model_type": "mixtral",
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        }
    )
    mx.random.seed(0)
    model = Mixtral(args)
    for layer, bits in zip(model.layers, (4, 4, 8, 3)):
        nn.quantize(layer.block_sparse_moe.switch_mlp, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def test_set_kernels_probes_each_geometry_once(monkeypatch, tmp_path):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)  # as on a Mac, kernels injected
    model = _mixed_model()
    calls = []
    kernels, caught = _caught(lambda: model.set_kernels("fused", tuner=_tuner(tmp_path, calls=calls)))
    assert kernels == "mixed"
    fused = [layer.block_sparse_moe.switch_mlp.fused for layer in model.layers]
    assert [g and (g.bits, g.rows_per_simdgroup) for g in fused] == [(4, 2), (4, 2), (8, 2), None]
    assert len(calls) == 2 * 4  # two geometries, each: three variants and the built-in path
    assert len(caught) == 1 and "1 of 4 MoE layers are quantized in a way the fused kernels do not handle" in str(
        caught[0].message
    )
    assert model.set_kernels("builtin") == "builtin" and all(
        layer.block_sparse_moe.switch_mlp.fused is None for layer in model.layers
    )
    # the model's outputs: the CPU runs the built-in ops whatever was chosen; the choice changes no number
    monkeypatch.undo()
    tokens = mx.array([[1, 5, 9]])
    before = model(tokens)
    model.set_kernels("builtin")
    assert mx.array_equal(before, model(tokens))


def test_unprobed_instantiation_never_runs_fused():
    """A layer runs only the geometry the probe approved: another dtype (say) falls back."""
    from mlx_mixtral.metal import fused_switch_glu

    mlp = _switch_glu(dtype=mx.float16)
    approved = plan_layer(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mx.float16, 2, 2)
    x, ids, w = mx.zeros((1, 1, 128), mx.float32), mx.zeros((1, 1, 2), mx.uint32), mx.ones((1, 1, 2))
    assert fused_switch_glu(x, ids, w, mlp.gate_proj, mlp.up_proj, mlp.down_proj, approved) is None


# ---------------------------------------------------------------- the decision cache


def test_cache_hit_skips_the_probe_but_rebuilds_the_choice(tmp_path):
    mlp = _switch_glu()
    first = []
    choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(tmp_path, calls=first))
    assert len(first) == 4
    rec, again = Recording(), []
    chosen = choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(tmp_path, launcher=rec.launcher, calls=again))
    assert chosen[0].rows_per_simdgroup == 2 and again == []  # nothing timed: the cache answered
    assert {r for r, _ in rec.calls} == {2}  # only the chosen variant built again, at both buffer kinds
    assert min(p for _, p in rec.calls) < CONSTANT_BELOW <= max(p for _, p in rec.calls)


def test_cache_hit_whose_choice_no_longer_builds_falls_to_the_next(tmp_path):
    mlp = _switch_glu()
    choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(tmp_path))
    broken = Launcher(_fails_at_eval, down_reference)
    chosen, caught = _caught(lambda: choose_kernels([(mlp, mx.float32)], 2, "fused", _tuner(tmp_path, launcher=broken)))
    assert chosen == [None] and len(caught) == 1  # R=2, then R=4, then R=1: each rebuilt, each failed
    stored = ProbeResult.from_json(DecisionCache(tmp_path / "probe.json").get(_key(mlp)))
    assert all(v.error and "GatherMM" in v.error for v in stored.variants)  # recorded for the next load


def _key(mlp, chip="Test M0"):
    return decisions.cache_key(chip, plan_layer(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mx.float32, 2))


def test_cache_miss_on_other_geometry_chip_or_versions(tmp_path, monkeypatch):
    mlp = _switch_glu()
    cache = DecisionCache(tmp_path / "probe.json")
    choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(tmp_path))
    assert cache.get(_key(mlp)) is not None
    assert cache.get(_key(mlp, chip="Test M9")) is None
    other = _switch_glu(bits=8)
    assert cache.get(_key(other)) is None

    def probes_again() -> bool:
        calls = []
        choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(tmp_path, calls=calls))
        return len(calls) == 4

    assert not probes_again()
    with monkeypatch.context() as m:
        m.setattr(mx, "__version__", "99.0.0")
        assert probes_again()
    with monkeypatch.context() as m:
        m.setattr(decisions, "package_version", lambda: "99.0")
        assert probes_again()
    shipped = decisions.kernel_source_hash()
    with monkeypatch.context() as m:
        body, header = decisions.kernel_text("gate_up_swiglu")
        m.setattr(decisions, "kernel_text", lambda kind: (body + "// edited\n", header))
        assert decisions.kernel_source_hash() != shipped
        assert probes_again()
    assert not probes_again()  # every environment kept its own entry


def test_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(tmp_path):
    path = tmp_path / "probe.json"
    mlp = _switch_glu()
    for junk in ["{not json", json.dumps({"format": 0, "entries": []}), json.dumps([1, 2]), "\x00\x01"]:
        path.write_text(junk)
        calls = []
        choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(tmp_path, calls=calls))
        assert len(calls) == 4
        assert json.loads(path.read_text())["format"] == decisions.FORMAT
    # an entry of the wrong shape is probed again, not trusted
    data = json.loads(path.read_text())
    data["entries"][0]["result"] = {"geometry": "x"}
    path.write_text(json.dumps(data))
    calls = []
    choose_kernels([(mlp, mx.float32)], 2, "auto", _tuner(tmp_path, calls=calls))
    assert len(calls) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]  # no temporary files left behind


def test_unwritable_cache_is_not_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    cache = DecisionCache(tmp_path / "file" / "probe.json")  # its directory cannot be made
    assert cache.put({"a": 1}, {"b": 2}) is False and cache.get({"a": 1}) is None
    mlp = _switch_glu()
    tuner = replace(_tuner(), cache=cache)
    assert choose_kernels([(mlp, mx.float32)], 2, "auto", tuner)[0].rows_per_simdgroup == 2


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(decisions.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert DecisionCache().path == tmp_path / "mine" / decisions.FILE_NAME
    monkeypatch.delenv(decisions.CACHE_ENV)
    assert decisions.cache_dir() == tmp_path / "xdg" / "mlx-mixtral"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert decisions.cache_dir() in (tmp_path / ".cache" / "mlx-mixtral", tmp_path / "Library/Caches/mlx-mixtral")


# ---------------------------------------------------------------- on a Mac: the real kernels


@on_metal
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32], ids=str)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_gpu_probe_builds_and_passes_every_variant(dtype, bits, group_size):
    with mx.stream(mx.gpu):
        mlp = _switch_glu(512, 384, 8, dtype, group_size, bits)
    result = probe_layer(mlp, dtype, 2, Tuner(cache=None))
    assert [v.error for v in result.variants] == [None] * len(ROW_VARIANTS), result
    assert result.builtin_us > 0 and all(v.us > 0 for v in result.variants)


@on_metal
def test_gpu_model_loads_fused_and_matches_the_builtin_ops(tmp_path, monkeypatch):
    monkeypatch.setenv(decisions.CACHE_ENV, str(tmp_path))
    model = _mixed_model()
    model.set_dtype(mx.float16)
    assert model.set_kernels("fused") == "mixed"
    tokens = mx.array([[1, 5, 9, 2]])
    cache = model.make_cache()
    fused = [model(tokens[:, :2], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in (2, 3)]
    model.set_kernels("builtin")
    cache = model.make_cache()
    builtin = [model(tokens[:, :2], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in (2, 3)]
    for a, b in zip(fused, builtin):
        scale = mx.abs(b).max().item()
        assert mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() <= 5e-2 * scale
    assert (tmp_path / decisions.FILE_NAME).is_file()


# ---------------------------------------------------------------- a user's command on such a Mac


@pytest.fixture(scope="module")
def tiny_4bit(tmp_path_factory):
    from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

    from mlx_mixtral.convert import convert

    root = tmp_path_factory.mktemp("probe_model")
    hf = add_tokenizer(make_hf_checkpoint(root / "hf", vocab_size=32000, seed=3))
    return convert(hf, root / "q4", quantize=True, q_bits=4, q_group_size=32)


def test_generate_on_a_mac_whose_kernels_fail_prints_one_warning_line(tiny_4bit, monkeypatch, capsys):
    """The kernels fail at evaluation, as a Metal compile error would: the command answers with the
    built-in ops, and stderr carries one warning line about it."""
    from mlx_mixtral.cli import main

    def run(*flags):
        assert main(["generate", "--model", str(tiny_4bit), "--prompt", "Hello", "--max-tokens", "4", *flags]) == 0
        return capsys.readouterr()

    expected = run("--kernels", "builtin")
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda d=None: {"max_recommended_working_set_size": 1 << 34})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: 0)
    broken = Launcher(_fails_at_eval, down_reference)
    monkeypatch.setattr(probe, "default_tuner", lambda: _tuner(launcher=broken))
    out = run()
    assert out.out == expected.out  # the same greedy answer
    lines = [line for line in out.err.splitlines() if "warning" in line]
    assert len(lines) == 1, out.err
    assert lines[0].startswith("mlx-mixtral generate: warning: fused expert kernel R=1, R=2, R=4 rejected for 2 MoE")
    assert lines[0].endswith("they run MLX's built-in ops")
