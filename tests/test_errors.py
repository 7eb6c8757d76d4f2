"""One error base: user-facing errors are MixtralErrors, printed by the CLI as one line; anything
else is a bug and keeps its traceback."""

import subprocess
import sys
import types

import pytest

from mlx_mixtral import errors
from mlx_mixtral.cli import dispatch as cli_main
from mlx_mixtral.convert import ConvertError
from mlx_mixtral.errors import MixtralError


def test_every_error_class_derives_from_the_base():
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    kinds = [k for k in classes if not issubclass(k, Warning)]
    assert len(kinds) >= 12 and all(issubclass(k, MixtralError) and issubclass(k, ValueError) for k in kinds)
    assert all(issubclass(k, errors.MixtralWarning) for k in classes if issubclass(k, Warning))
    assert ConvertError is errors.ConvertError


def _command(monkeypatch, raises: BaseException):
    module = types.ModuleType("fake_command")

    def main(argv):
        raise raises

    module.main = main
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setitem(cli_main.COMMANDS, "fake", ("fake_command", "a command that fails"))


def test_the_dispatcher_reports_a_mixtral_error_in_one_line(monkeypatch, capsys):
    _command(monkeypatch, errors.LoadError("/m: missing tensor 'x'\n  (and 2 more)"))
    assert cli_main.main(["fake"]) == 1
    assert capsys.readouterr().err == "mlx-mixtral fake: error: /m: missing tensor 'x' (and 2 more)\n"
    _command(monkeypatch, errors.OptionError("top_p must be in (0, 1], got 2", option="top_p"))
    assert cli_main.main(["fake"]) == 2  # a usage error


def _warning_command(monkeypatch, *warns: tuple[str, type, str]):
    """A command that warns (message, category, as if from module) and succeeds."""
    import warnings

    module = types.ModuleType("fake_command")

    def main(argv):
        for message, category, where in warns:
            warnings.warn_explicit(message, category, f"{where}.py", 1, module=where)
        return 0

    module.main = main
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setitem(cli_main.COMMANDS, "fake", ("fake_command", "a command that warns"))


def test_the_dispatcher_shows_each_warning_as_one_line(monkeypatch, capsys):
    _warning_command(
        monkeypatch,
        ("fused expert kernel R=4 rejected\n  (compiler log)", errors.KernelFallbackWarning, "mlx_mixtral.metal.probe"),
        ("/m: model needs 30.0 GiB, only 20.0 GiB free now; expect swapping", ResourceWarning, "mlx_mixtral.loader"),
        ("someone else's unclosed file", ResourceWarning, "somelib"),  # hidden, as Python hides it
    )
    assert cli_main.main(["fake"]) == 0
    assert capsys.readouterr().err == (
        "mlx-mixtral fake: warning: fused expert kernel R=4 rejected (compiler log)\n"
        "mlx-mixtral fake: warning: /m: model needs 30.0 GiB, only 20.0 GiB free now; expect swapping\n"
    )


def test_a_bug_keeps_its_traceback(monkeypatch):
    _command(monkeypatch, KeyError("boom"))
    with pytest.raises(KeyError):
        cli_main.main(["fake"])


def test_python_m_convert_goes_through_the_dispatcher(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mlx_mixtral.convert", "--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-mixtral convert: error:"), r.stderr
