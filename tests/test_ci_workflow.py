"""The GitHub Actions workflow: valid against GitHub's workflow schema (check-jsonschema's builtin
copy, so offline), a Linux job that runs .ci/run, and a macOS job that runs the Metal tests, doctor
and bench on a runner a workflow_dispatch input can change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "ci.yml"


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_matches_github_schema():
    r = _validate(WORKFLOW)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "edit",
    [
        lambda w: w["jobs"]["linux"].pop("runs-on"),
        lambda w: w["jobs"]["macos-metal"]["steps"][0].update(uses=None, run=None),
        lambda w: w.update(jobs=["linux"]),
    ],
    ids=["no-runs-on", "empty-step", "jobs-not-a-map"],
)
def test_the_schema_check_can_fail(tmp_path, edit):
    workflow = _workflow()
    edit(workflow)
    broken = tmp_path / "ci.yml"
    broken.write_text(yaml.safe_dump(workflow))
    assert _validate(broken).returncode != 0


def _runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_linux_job_runs_the_ci_script():
    job = _workflow()["jobs"]["linux"]
    assert job["runs-on"].startswith("ubuntu") and "bash .ci/run" in _runs(job)


def test_macos_job_runs_metal_tests_doctor_and_bench():
    workflow = _workflow()
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["workflow_dispatch"]["inputs"]["macos_runner"]["default"] == "macos-14"
    job = workflow["jobs"]["macos-metal"]
    assert job["runs-on"] == "${{ inputs.macos_runner || 'macos-14' }}"
    runs = _runs(job)
    assert 'pip install -e ".[test]"' in runs
    assert "pytest" in runs and "tests/test_metal_reference.py" in runs and "tests/test_kernel_probe.py" in runs
    assert "sys.exit(n == 0 or k > 0)" in runs  # the Metal tests must run there, not skip
    assert "mlx-mixtral doctor --json" in runs and "doctor_schema.json" in runs
    assert "mlx-mixtral bench --model tiny/f16-4bit --kernels both" in runs
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "doctor.json" in upload["with"]["path"] and upload["if"] == "always()"


def test_every_metal_test_the_job_selects_exists():
    """`-k gpu` must select the GPU tests of both files (they are skipped here, so count them)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-k",
            "gpu",
            "tests/test_metal_reference.py",
            "tests/test_kernel_probe.py",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=WORKFLOW.parents[2],
    )
    selected = [line for line in r.stdout.splitlines() if "::test_gpu_" in line]
    files = {line.split("::")[0] for line in selected}
    assert files == {"tests/test_metal_reference.py", "tests/test_kernel_probe.py"} and len(selected) > 50
