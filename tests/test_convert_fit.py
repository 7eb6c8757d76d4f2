"""`convert --fit SIZE`: the best setting, in the measured quality order, whose output fits."""

import json
import subprocess
import sys

import pytest
from helpers.tiny_models import make_hf_checkpoint

from mlx_mixtral.convert import convert
from mlx_mixtral.convert.fit import QUALITY_ORDER, output_size
from mlx_mixtral.convert.source import open_source
from mlx_mixtral.errors import ConvertError


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("fit") / "hf", intermediate_size=256, hidden_size=128)


def test_fit_takes_the_first_setting_in_quality_order_that_fits(source_dir, tmp_path):
    source = open_source(source_dir)
    sizes = [output_size(source, settings, None, None) for _, settings in QUALITY_ORDER]
    # A budget just below the best setting's size: the first of the rest that fits is chosen.
    budget = sizes[0] - 1
    expected = next(i for i, size in enumerate(sizes) if size <= budget)
    chosen = []
    out = convert(source_dir, tmp_path / "out", fit=budget, on_fit=chosen.append)
    assert chosen[0].label == QUALITY_ORDER[expected][0] and chosen[0].size == sizes[expected]
    written = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert written == sizes[expected] <= budget
    with pytest.raises(ConvertError, match="nothing fits"):
        convert(source_dir, tmp_path / "none", fit=min(sizes) - 1)


def test_fit_is_printed_before_converting(source_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "mlx_mixtral", "convert", "--hf-path", str(source_dir), "--mlx-path",
                          str(tmp_path / "o"), "--fit", "100MB", "--no-progress"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    first = run.stderr.splitlines()[0]
    assert first.startswith("mlx-mixtral convert: --fit 100.0 MB: uniform 8-bit, ") and first.endswith(" of weights")
