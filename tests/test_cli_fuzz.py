"""Every command's parser and entry point on generated argv and stdin bytes, in-process through the
dispatcher (cli.dispatch.main): whatever the input, the command ends with status 0, or with 1 or 2
and exactly one line on stderr (`mlx-mixtral <command>: error: ...`), and never with a traceback.

The argv values mix valid ones with the odd: numbers out of range or not numbers (nan, inf, huge,
empty), text whose bytes are not UTF-8 (given as Python gets it from the OS, surrogate-escaped),
paths that are missing, files, under /proc or under a file, hub ids that are not cached, bogus
chat templates, unknown flags and stray words. Commands that need a model get the tiny memorized
one (tests/helpers/memorized.py); a model is loaded once per path and reused. `serve` stops where
it would start listening, and the hub upload is a fake that fails.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers.memorized import TRANSCRIPT, memorized_4bit, memorized_hf
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from mlx_mixtral.cli import dispatch

DOCUMENTED_STATUSES = {0, 1, 2}  # success, an error, a usage error
# Before it can fail a command may say what it loads (serve: minutes, for a real model) and the
# memory plan it loads it by.
PROGRESS = ("loading ", "plan: ")
RESULTS: dict[str, Counter] = {}


def os_text(max_size: int = 12):
    """Strings as Python decodes argv: any bytes but NUL, invalid UTF-8 surrogate-escaped."""
    raw = st.binary(max_size=max_size).filter(lambda b: b"\x00" not in b)
    return raw.map(lambda b: b.decode("utf-8", errors="surrogateescape"))


def values(valid: list[str], odd: list[str] | None = None, text: bool = False):
    """(valid values, odd ones): a draw takes an odd one about one time in four, so most runs get
    past the parser and several flags' values meet in one run."""
    odd_values = st.sampled_from(odd) if odd else st.nothing()
    if text:
        odd_values = st.one_of(odd_values, os_text())
    return st.sampled_from(valid), odd_values


ODD_INTS = ["-1", "-0", "x", "", "1e3", " 4", "99999999999999999999999"]
ODD_FLOATS = ["-0.0", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "x", ""]
TEXT = values(["hello world", "The cat", "-", "caf\udce9", "\udcff\udcfe x"], ["", "--", "-x"], text=True)
TEMPLATES = values(
    ["mistral-v1", "mistral-v3"], ["jinja", "bogus", "", "{{ messages }}", "{% for x %}", "{{ 1/0 }}"], text=True
)
KERNELS = values(["auto", "builtin"], ["fused", "x"])
FLAG = None


def model_paths(ctx):
    return values(
        [ctx["mlx"], ctx["mlx"], ctx["hf"]], ["./nope", "models/nope", "org/name", "notes.txt", "/proc/x", "", "~nope"]
    )


def out_paths(ctx, valid: list[str]):
    odd = ["notes.txt", "notes.txt/x", "/proc/x", "/etc/passwd/x", ".", "", ctx["hf"], "sub", "caf\udce9"]
    return values(valid, odd + [f"{ctx['hf']}/model.safetensors"])


def specs(ctx) -> dict[str, dict[str, tuple | None]]:
    """For each command, its flags and the values to try (FLAG: a flag without a value)."""
    sampling = {
        "--model": model_paths(ctx),
        "--max-tokens": values(["0", "1", "3"], ODD_INTS),
        "--temp": values(["0", "0.7", "1"], ODD_FLOATS + ["2.5"]),
        "--top-p": values(["0.5", "0.9", "1"], ODD_FLOATS + ["0", "2"]),
        "--top-k": values(["0", "1", "40"], ODD_INTS),
        "--min-p": values(["0", "0.1"], ODD_FLOATS + ["1"]),
        "--repetition-penalty": values(["1", "1.1"], ODD_FLOATS + ["0"]),
        "--seed": values(["0", "1", "42"], ODD_INTS),
        "--stop": TEXT,
        "--system": TEXT,
        "--chat-template": TEMPLATES,
        "--distributed": FLAG,
        "--kernels": KERNELS,
    }
    sizes = ["1", "16", "4096"]
    return {
        "generate": {**sampling, "--prompt": TEXT, "--chat": FLAG, "--quiet": FLAG},
        "chat": {**sampling, "--max-kv-size": values(["8", "64"], ODD_INTS), "--stats": FLAG},
        "serve": {
            "--model": model_paths(ctx),
            "--host": values(["127.0.0.1", "::1", "localhost"], ["0.0.0.0", "no.such.host.invalid", ""]),
            "--port": values(["0", "8080"], ["-1", "65536", "x", "99999999999999999999"]),
            "--api-key": TEXT,
            "--cors-origin": TEXT,
            "--served-model-name": TEXT,
            "--max-tokens-cap": values(sizes, ODD_INTS),
            "--max-body-bytes": values(sizes, ODD_INTS),
            "--max-messages": values(sizes, ODD_INTS),
            "--max-kv-size": values(sizes, ODD_INTS),
            "--prompt-cache-size": values(["0", "4"], ODD_INTS),
            "--chat-template": TEMPLATES,
            "--log-level": values(["info", "debug", "warning"], ["loud", ""]),
            "--distributed": FLAG,
            "--kernels": KERNELS,
        },
        "bench": {
            "--model": model_paths(ctx),
            "--prompt-lengths": values(["4", "4,8"], ["0", "x", "", "4,,8", "-1", "600", "99999999999999"]),
            "--decode-tokens": values(["1", "2"], ["0", "-1", "x", "", "600"]),
            "--reps": values(["1", "2"], ["0", "-1", "x", ""]),
            "--kernels": values(["on", "off", "both"], ["x"]),
            "--bandwidth": values(["100", "400"], ODD_FLOATS + ["0"]),
            "--plot": out_paths(ctx, ["plot.png", "sub/plot.png"]),
            "--json": out_paths(ctx, ["bench.json", "sub/bench.json"]),
        },
        "convert": {
            "--hf-path": values([ctx["hf"], ctx["mlx"]], ["./nope", "org/name", "notes.txt", ""]),
            "--mlx-path": out_paths(ctx, ["out", "a/b/out", "out2"]),
            "-q": FLAG,
            "--q-bits": values(["2", "4", "8"], ["7", "x", "-1"]),
            "--q-group-size": values(["32", "64"], ["16", "x"]),
            "--q-mode": values(["affine", "mxfp4", "nvfp4"], ["int4"]),
            "--recipe": values(["mixed_3_6", "mixed_2_6"], ["bogus"]),
            "--dtype": values(["float16", "bfloat16", "float32"], ["float64"]),
            "-d": FLAG,
            "--max-shard-size": values(["5GB", "50KB"], ["0", "lots", "-1GB", "1e400GB"]),
            "--force": FLAG,
            "--revision": TEXT,
            "--upload-repo": values(["someone/model"], ["not a repo"]),
        },
    }


# Lines a person might type at the chat prompt, and bytes nobody would.
CHAT_LINES = st.one_of(
    st.sampled_from(
        ["/quit", "/help", "/reset", "/system be brief", "/system", "/save s1", "/load s1", "/load nope", "/load ."]
        + ["/save /proc/x", "/load /etc/passwd", "/save", "/bogus", TRANSCRIPT[0]["content"], "", "   "]
    ),
    st.binary(max_size=24).map(lambda b: b.replace(b"\n", b"").decode("latin-1")),
).map(lambda line: line.encode("latin-1") if all(ord(c) < 256 for c in line) else line.encode())


@st.composite
def invocations(draw, command: str, ctx):
    flags = specs(ctx)[command]
    chosen = draw(st.lists(st.sampled_from(sorted(flags)), max_size=5, unique=True))
    argv = []
    if command in ("generate", "chat"):
        argv += ["--model", ctx["mlx"], "--max-tokens", "4"]  # defaults a draw may override (the last wins)
    if command == "generate":
        argv += ["--prompt", "The cat"]
    if command == "convert":
        argv += ["--hf-path", ctx["hf"], "--mlx-path", "out", "--no-progress"]
    if command == "serve":
        argv += ["--model", ctx["mlx"]]
    if command == "bench":
        argv += ["--model", ctx["mlx"], "--prompt-lengths", "4", "--decode-tokens", "2", "--reps", "1"]
    for flag in chosen:
        argv.append(flag)
        if flags[flag] is not FLAG:
            valid, odd = flags[flag]
            argv.append(draw(odd if draw(st.integers(0, 3)) == 0 else valid))
    if draw(st.integers(0, 9)) == 0:  # a stray word or flag somewhere
        argv.insert(draw(st.integers(0, len(argv))), draw(st.one_of(os_text(), st.sampled_from(["--nope", "-"]))))
    if draw(st.integers(0, 19)) == 0:
        argv.append("--help")
    lines = draw(st.lists(CHAT_LINES, max_size=4)) if command == "chat" else [draw(st.binary(max_size=40))]
    return argv, b"\n".join(lines) + (b"\n" if lines and draw(st.booleans()) else b"")


class WouldListen(Exception):
    """`serve` got as far as binding its port: everything the user gave was accepted."""


def run(command: str, argv: list[str], stdin: bytes) -> tuple[int, str, str]:
    """One in-process run through the dispatcher, with byte-level stdin and real text streams."""
    out, err = io.BytesIO(), io.BytesIO()
    real = sys.stdin, sys.stdout, sys.stderr
    # Held here: a wrapper that is collected closes its buffer.
    streams = (
        io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
        io.TextIOWrapper(out, encoding="utf-8", write_through=True),
        io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True),
    )
    sys.stdin, sys.stdout, sys.stderr = streams
    try:
        status = dispatch.main([command, *argv])
    except SystemExit as e:  # --help, and serve's end (os._exit, made an exception here)
        status = e.code if isinstance(e.code, int) else 1
    except WouldListen:
        status = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdin, sys.stdout, sys.stderr = real
    result = status, out.getvalue().decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace")
    for stream in streams:
        stream.detach()
    return result


def screen_lines(stderr: str) -> list[str]:
    """The lines a terminal would show (a progress bar redraws its line after each carriage return)."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.split("\n") if line.rsplit("\r", 1)[-1].strip()]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return {"mlx": str(memorized_4bit(tmp_path_factory)), "hf": str(memorized_hf(tmp_path_factory))}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory with a file in it, model loads memoized, no listening, no upload."""
    import huggingface_hub

    from mlx_mixtral.cli import options as cli_options
    from mlx_mixtral.cli import serve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "sub").mkdir()
    monkeypatch.setattr(cli_options, "load", _memoized(cli_options.load))
    monkeypatch.setattr(serve, "_listen", lambda host, port: (_ for _ in ()).throw(WouldListen()))
    monkeypatch.setattr(os, "_exit", lambda status: (_ for _ in ()).throw(SystemExit(status)))

    class OfflineHub:
        def __init__(self, *a, **k):
            pass

        def create_repo(self, *a, **k):
            raise OSError("the hub is not reachable from the tests")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineHub)
    return tmp_path


def _memoized(load):
    loaded = {}

    @functools.wraps(load)
    def cached(path, **kwargs):
        key = (
            str(Path(path).expanduser().resolve()) if os.path.isdir(os.path.expanduser(path)) else path,
            repr(kwargs),
        )
        if key not in loaded:
            loaded[key] = load(path, **kwargs)
        return loaded[key]

    return cached


CASES = {"generate": 80, "chat": 50, "serve": 80, "bench": 25, "convert": 35}
# For a longer hunt: MLX_MIXTRAL_FUZZ_SCALE=10 MLX_MIXTRAL_FUZZ_SEED=7 runs 10x the cases from another seed.
SCALE = float(os.environ.get("MLX_MIXTRAL_FUZZ_SCALE", "1"))
SEED = os.environ.get("MLX_MIXTRAL_FUZZ_SEED")


@pytest.mark.parametrize("command", list(CASES))
def test_no_input_crashes_a_command(command, ctx, sandbox):
    results = RESULTS.setdefault(command, Counter())

    @given(invocation=invocations(command, ctx))
    @seed(int(SEED or 0))
    @settings(
        max_examples=int(CASES[command] * SCALE),
        deadline=None,
        derandomize=SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(invocation):
        argv, stdin = invocation
        case = f"mlx-mixtral {command} {argv!r} with stdin {stdin!r}"
        try:
            status, out, err = run(command, argv, stdin)
        except Exception as e:  # a crash: the bug this test is for
            raise AssertionError(f"{case}: {type(e).__name__}: {e}") from e
        results[status] += 1
        if os.environ.get("MLX_MIXTRAL_FUZZ_LOG"):
            with open(os.environ["MLX_MIXTRAL_FUZZ_LOG"], "a") as log:
                log.write(f"{status} {argv!r} | {screen_lines(err)[-1:] if status else ''}\n")
        assert "Traceback" not in err, f"{case}:\n{err}"
        assert status in DOCUMENTED_STATUSES, f"{case}: status {status}\n{err}"
        if status != 0:
            lines = [line for line in screen_lines(err) if not line.startswith(PROGRESS)]
            assert len(lines) == 1, f"{case}:\n{err}"
            assert lines[0].startswith(f"mlx-mixtral {command}: error: "), f"{case}: {lines[0]}"

    check()
    print(f"\n{command}: {sum(results.values())} runs, exit statuses {dict(sorted(results.items()))}")
    assert results[0] and (results[1] or results[2])  # both accepted and refused inputs were generated
