"""`mlx-mixtral doctor`: its JSON document against its schema (off a Mac: the CPU backend and no
kernels; with injected kernels: a probed model), the memory check's decision, the disk read."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from importlib import resources

import jsonschema
import mlx.core as mx
import pytest
from helpers.tiny_models import make_hf_checkpoint
from safetensors import safe_open

from mlx_mixtral import diagnostics
from mlx_mixtral.cli.doctor import text
from mlx_mixtral.metal.probe import Tuner
from mlx_mixtral.metal.reference import TWINS

SCHEMA = json.loads(resources.files("mlx_mixtral.cli").joinpath("doctor_schema.json").read_text())


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    from mlx_mixtral.convert import convert

    root = tmp_path_factory.mktemp("doctor")
    return convert(make_hf_checkpoint(root / "hf"), root / "q4", quantize=True, q_bits=4, q_group_size=32)


def _doctor(*args):
    r = subprocess.run(
        [sys.executable, "-m", "mlx_mixtral", "doctor", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return r


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.skipif(mx.metal.is_available(), reason="checks what it says off a Mac")
def test_json_off_a_mac_reports_the_cpu_and_no_kernels(q4):
    doc = json.loads(_doctor("--json", "--model", str(q4)).stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["mlx"]["backend"] == "cpu" and doc["mlx"]["metal_available"] is False
    assert doc["kernels"]["reason"] == "no Metal, kernels not available" and doc["kernels"]["geometries"] == []
    assert doc["memory"]["gpu_working_set_bytes"] is None and doc["memory"]["total_bytes"] > 0
    model = doc["model"]
    assert model["path"] == str(q4) and model["error"] is None
    assert model["memory_plan"]["decision"] == "resident" and model["memory_plan"]["line"].startswith(
        "plan: all resident"
    )
    weights = q4 / "model.safetensors"
    assert model["disk_read"]["file"] == str(weights) and model["disk_read"]["bytes"] == weights.stat().st_size


def test_human_text_off_a_mac():
    if mx.metal.is_available():
        pytest.skip("checks what it says off a Mac")
    out = _doctor().stdout
    assert "backend cpu" in out and "kernels      no Metal, kernels not available" in out


def test_probed_model_document_validates(q4):
    """With the twins as kernels (as the probe runs on a Mac), every kernel field is filled."""
    doc = diagnostics.report(str(q4), tuner=Tuner(launcher=TWINS, cache=None, device=mx.cpu))
    jsonschema.validate(doc, SCHEMA)
    (geometry,) = doc["kernels"]["geometries"]
    assert geometry["geometry"] == "float32/g32/4bit/down:g32/4bit/D64/F96/E4/K2"  # the model's own experts
    assert geometry["max_error"] == 0.0 and [v["rows_per_simdgroup"] for v in geometry["variants"]] == [1, 2, 4]
    lines = text(doc)
    assert any(line.startswith("  float32/g32/4bit") and "fused R=" in line for line in lines)
    # the schema can fail: a missing field, an extra field, a wrong value
    for edit in (
        lambda d: d["kernels"].pop("reason"),
        lambda d: d["memory"].update(swap_bytes=0),
        lambda d: d["kernels"]["geometries"][0]["variants"][0].update(rows_per_simdgroup=3),
        lambda d: d["model"]["memory_plan"].update(decision="maybe"),
    ):
        broken = copy.deepcopy(doc)
        edit(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)


def test_synthetic_layer_probe(monkeypatch):
    """Without a model the doctor probes a synthetic layer of random quantized experts."""
    from mlx_mixtral.metal.bench import compare_fused_builtin

    summary = compare_fused_builtin(
        hidden=256,
        ffn=128,
        experts=4,
        group_size=64,
        dtype=mx.float32,
        tuner=Tuner(launcher=TWINS, cache=None, device=mx.cpu),
    )
    assert summary["geometry"] == "float32/g64/4bit/down:g64/4bit/D256/F128/E4/K2"
    assert summary["max_error"] == 0.0 and summary["builtin_us"] > 0


def test_memory_plan_from_the_headers(q4):
    """The doctor reports the planner's decision, with the weight bytes of the checkpoint's headers."""
    from mlx_mixtral.memory.plan import plan

    with safe_open(str(q4 / "model.safetensors"), "numpy") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    fit = diagnostics.memory_fit(q4)
    p = plan(q4)
    assert (
        fit["decision"] == p.decision and fit["weight_bytes"] == p.weight_bytes >= stored
    )  # float32 scales on the CPU
    assert fit["budget"] == p.budget.source


def test_disk_read_counts_what_it_read(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 3000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"y" * 5000)
    ticks = iter([10.0, 10.5])
    r = diagnostics.disk_read(tmp_path, nbytes=4096, clock=lambda: next(ticks))
    assert r["file"].endswith("model-00002-of-00002.safetensors") and r["bytes"] == 4096  # the largest file
    assert r["seconds"] == 0.5 and r["gb_per_s"] == 4096 / 0.5 / 1e9
    if sys.platform == "linux":
        assert r["page_cache"] == "evicted first (posix_fadvise)" and r["may_be_cached"] is False


def test_a_model_not_downloaded_is_reported_not_fetched(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    doc = diagnostics.report("some-org/not-here")
    jsonschema.validate(doc, SCHEMA)
    assert "not a local directory, nor in the local hub cache" in doc["model"]["error"]
