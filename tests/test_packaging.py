"""The wheel carries the runtime, the converter and the Metal sources inside `mlx_mixtral`."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("mlx_mixtral-*.whl")
    with zipfile.ZipFile(wheel) as z:
        entry_points = next(z.read(n).decode() for n in z.namelist() if n.endswith("entry_points.txt"))
        return set(z.namelist()), entry_points


def test_converter_and_metal_install_inside_the_package(wheel):
    wheel_names, _ = wheel
    tops = {name.split("/")[0] for name in wheel_names}
    assert tops == {"mlx_mixtral", next(t for t in tops if t.endswith(".dist-info"))}
    for module in (
        "mlx_mixtral/model.py",
        "mlx_mixtral/loader.py",
        "mlx_mixtral/convert/__init__.py",
        "mlx_mixtral/metal/__init__.py",
        "mlx_mixtral/cli/doctor_schema.json",
    ):
        assert module in wheel_names


def test_every_metal_source_ships(wheel):
    wheel_names, _ = wheel
    sources = [p for p in (ROOT / "metal").iterdir() if p.suffix in (".metal", ".h")]
    assert sources
    for src in sources:
        assert f"mlx_mixtral/metal/{src.name}" in wheel_names


def test_console_script_declared(wheel):
    _, entry_points = wheel
    assert "mlx-mixtral = mlx_mixtral.cli:main" in entry_points


def test_cli_runs_as_module_and_script():
    for cmd in (
        [sys.executable, "-m", "mlx_mixtral", "--help"],
        [str(Path(sys.executable).parent / "mlx-mixtral"), "--help"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "convert" in out.stdout and "serve" in out.stdout
