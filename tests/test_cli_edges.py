"""What a new user runs into at the edges of the commands: a reader that closes the pipe, usage
errors, --help, local paths against hub ids, a --max-tokens past the context, a bogus chat
template, and the chat's /save and /load of files that are not there or not sessions."""

import os
import pty
import re
import subprocess
import sys

import pytest
from helpers.memorized import TEXT_PROMPT, TRANSCRIPT, memorized_4bit
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

from mlx_mixtral import load, stream_generate
from mlx_mixtral.cli import main
from mlx_mixtral.cli.parser import CommandParser
from mlx_mixtral.errors import ContextLimitError, LoadError
from mlx_mixtral.loader import resolve_model_dir

COMMANDS = ["convert", "generate", "chat", "serve", "bench"]
CONTEXT = 64


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    return memorized_4bit(tmp_path_factory)


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """Random weights (they talk on, no early EOS) with the real tokenizer and a 64-token context."""
    path = tmp_path_factory.mktemp("short_context")
    return add_tokenizer(make_hf_checkpoint(path, vocab_size=32000, max_position_embeddings=CONTEXT, seed=5))


def _run(*args, stdin=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_mixtral", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        cwd=cwd,
    )


def _one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("plan: ")]  # the memory plan
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"mlx-mixtral {command}: error: "), lines[0]
    return lines[0]


# --- a closed pipe -------------------------------------------------------------------------------
def test_a_reader_that_leaves_early_ends_generate_quietly(short_context):
    cmd = f"{sys.executable} -m mlx_mixtral generate --model {short_context} --prompt Hello --max-tokens 1000"
    r = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{cmd} | head -c 20"], capture_output=True, text=True, timeout=300
    )
    assert len(r.stdout.encode()) <= 20
    # no traceback, no "Exception ignored" at exit, no statistics of a cut run: only the memory plan
    assert [line for line in r.stderr.splitlines() if not line.startswith("plan: ")] == []
    assert r.returncode == 141  # 128 + SIGPIPE, as the shell reports a program SIGPIPE ended


# --- usage errors and help -----------------------------------------------------------------------
USAGE_ERRORS = [(command, ["--no-such-flag"]) for command in COMMANDS] + [
    ("convert", []),
    ("generate", []),
    ("serve", []),
    ("bench", []),
    ("convert", ["--hf-path", "s", "--mlx-path", "d", "--q-bits", "ten"]),
    ("generate", ["--prompt", "x", "--max-tokens", "ten"]),
    ("chat", ["--max-kv-size", "x"]),
    ("serve", ["--model", "m", "--port", "ten"]),
    ("bench", ["--model", "m", "--reps", "ten"]),
]


@pytest.mark.parametrize("command, argv", USAGE_ERRORS)
def test_usage_errors_are_one_line_with_the_commands_prefix(command, argv, capsys):
    assert main([command, *argv]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    line = _one_error_line(out.err, command)
    assert line.endswith(f"(see 'mlx-mixtral {command} --help')")


def test_unknown_command_is_one_line(capsys):
    assert main(["genrate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlx-mixtral: error: unknown command 'genrate'")


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("flag", ["--max-memory", "--expert-cache", "--kv-bits"])
def test_memory_flags_with_distributed_are_refused_not_ignored(command, flag, capsys):
    argv = [
        command,
        "--model",
        "no-such-dir-here",
        "--distributed",
        flag,
        {"--expert-cache": "30%", "--kv-bits": "8"}.get(flag, "8GB"),
    ]
    assert main(argv + (["--prompt", "x"] if command == "generate" else [])) == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert flag in line and "--distributed" in line


def _parser_of(command, monkeypatch, capsys) -> CommandParser:
    seen = []
    real = CommandParser.parse_known_args

    def recording(self, *a, **k):
        seen.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(CommandParser, "parse_known_args", recording)
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return seen[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_each_default_once(command, monkeypatch, capsys):
    monkeypatch.setenv("MLX_MIXTRAL_API_KEY", "sekrit-key-123")
    parser = _parser_of(command, monkeypatch, capsys)
    text = capsys.readouterr().out
    assert "sekrit-key-123" not in text  # an environment default is named, never shown
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == "show this help message and exit":
            continue
        shown = formatter._expand_help(action) if action.help else ""
        assert shown, f"{action.option_strings[0]} has no help"
        assert shown.count("default") <= 1, shown
        assert "(default: None)" not in shown and "(default: [])" not in shown, shown
        if action.required:
            assert "default" not in shown, shown
    if command in ("generate", "chat"):
        assert "(default: mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit)" in " ".join(text.split())
        assert re.search(
            r"--max-tokens MAX_TOKENS\s+most tokens to generate .*\(default: \d+\)", " ".join(text.split())
        )


def test_generate_ends_its_answer_with_a_newline_on_a_terminal(memorized):
    pid, fd = pty.fork()
    if pid == 0:
        args = ["generate", "--model", str(memorized), "--prompt", TEXT_PROMPT, "--max-tokens", "3", "--quiet"]
        os.execv(sys.executable, [sys.executable, "-m", "mlx_mixtral", *args])
    screen = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert screen == b" the dog sat\r\n"


# --- local directory or hub id -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["./nope", "../nope", "/no/such/dir", "~/no-such-model-dir", "nope"])
def test_a_path_that_does_not_exist_says_so(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError, match=rf"^{re.escape(name)}: no such directory"):
        resolve_model_dir(name)


def test_an_org_name_that_is_no_directory_is_a_hub_id_and_the_message_says_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError) as e:
        resolve_model_dir("models/nope")
    assert str(e.value).startswith("models/nope: not in the local hub cache")
    assert "no local directory 'models/nope'" in str(e.value)


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(LoadError, match="model.safetensors: not a directory"):
        resolve_model_dir(tmp_path / "model.safetensors")


def test_an_org_name_that_is_a_local_directory_is_local(tmp_path, monkeypatch, memorized):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    os.symlink(memorized, tmp_path / "org" / "name")
    assert resolve_model_dir("org/name").resolve() == memorized.resolve()


def test_generate_names_the_missing_directory(tmp_path):
    r = _run("generate", "--model", "./nope", "--prompt", "hi", cwd=tmp_path)
    assert r.returncode == 1
    assert _one_error_line(r.stderr, "generate") == "mlx-mixtral generate: error: ./nope: no such directory"


# --- the context ---------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [None, 1_000_000])
def test_stream_generate_stops_where_the_context_ends(short_context, max_tokens):
    model, tok = load(short_context)
    prompt = tok.encode("Hello there", add_special_tokens=True)
    responses = list(stream_generate(model, tok, prompt, max_tokens=max_tokens))
    assert len(responses) == CONTEXT - len(prompt) and responses[-1].finish_reason == "length"
    # A sliding window never runs out of room, so there the limit is max_tokens alone.
    windowed = list(stream_generate(model, tok, prompt, max_tokens=CONTEXT, cache=model.make_cache(max_kv_size=16)))
    assert len(windowed) == CONTEXT
    with pytest.raises(ContextLimitError, match=f"the model's context is {CONTEXT} tokens"):
        next(stream_generate(model, tok, list(range(5, 5 + CONTEXT)), max_tokens=1))


def test_generate_says_when_the_context_cut_the_answer(short_context):
    r = _run("generate", "--model", short_context, "--prompt", "Hello there", "--max-tokens", "1000000")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("plan: ")]
    assert len(lines) == 2 and "Traceback" not in r.stderr
    assert lines[0] == f"(the answer stopped where the model's context of {CONTEXT} tokens ends)"
    prompt, generated = map(int, re.search(r"prompt: (\d+) tokens.*generation: (\d+) tokens", lines[1]).groups())
    assert prompt + generated == CONTEXT


# --- chat templates ------------------------------------------------------------------------------
@pytest.mark.parametrize("command, extra", [("generate", ["--prompt", "hi"]), ("chat", [])])
def test_a_bogus_chat_template_is_refused_at_start(command, extra, memorized):
    r = _run(command, "--model", memorized, "--chat-template", "bogus", *extra, stdin="hi\n")
    assert r.returncode == 1 and r.stdout == ""
    line = _one_error_line(r.stderr, command)
    assert "--chat-template: unknown chat template 'bogus'" in line


def test_generate_with_a_chat_template_uses_it(memorized):
    r = _run("generate", "--model", memorized, "--chat-template", "mistral-v1", "--prompt", TRANSCRIPT[0]["content"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == TRANSCRIPT[1]["content"]


# --- /save and /load -----------------------------------------------------------------------------
def test_chat_save_and_load_of_bad_paths_say_what_is_wrong(memorized, tmp_path):
    (tmp_path / "notes.txt").write_text("not a session")
    (tmp_path / "adir").mkdir()
    commands = [
        f"/load {tmp_path / 'missing.safetensors'}",
        f"/load {tmp_path / 'adir'}",
        f"/load {tmp_path / 'notes.txt'}",
        TRANSCRIPT[0]["content"],
        f"/save {tmp_path / 'no' / 'such' / 'dir' / 'chat'}",
        f"/save {tmp_path / 'adir'}",
        f"/save {tmp_path / 'chat'}",  # no extension: the file is called exactly that
        f"/load {tmp_path / 'chat'}",
    ]
    r = _run("chat", "--model", memorized, stdin="\n".join(commands) + "\n", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    said = r.stderr
    assert f"/load: {tmp_path / 'missing.safetensors'}: no such file" in said
    assert f"/load: {tmp_path / 'adir'}: is a directory, not a saved chat" in said
    assert f"/load: {tmp_path / 'notes.txt'}: not a saved chat (not a safetensors file)" in said
    assert f"/save: {tmp_path / 'no' / 'such' / 'dir'}: no such directory" in said
    assert f"/save: {tmp_path / 'adir'}: is a directory" in said
    assert f"(saved 2 messages to {tmp_path / 'chat'})" in said
    assert f"(loaded 2 messages from {tmp_path / 'chat'})" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "chat", "notes.txt"]  # no stray files
    assert list((tmp_path / "adir").iterdir()) == []


# --- what the argv harness (test_cli_fuzz.py) found --------------------------------------------------
FOUND = [
    (["generate", "--prompt", "hi", "--seed", "-1"], 2, "--seed: seed must be in [0, 2**64), got -1"),
    (["generate", "--prompt", "hi", "--seed", str(2**64)], 2, "--seed: seed must be in [0, 2**64)"),
    (["generate", "--prompt", "hi", "--chat-template", "{{ 1/0 }}"], 1, "chat template failed: ZeroDivisionError"),
    (["chat", "--chat-template", "{{ messages[0].nope.nope }}"], 1, "chat template: 'dict object' has no attribute"),
    (["chat", "--chat-template", "{{ messages[5] }}"], 1, "the template turns a conversation into no tokens"),
    (["generate", "--prompt", "hi", "--model", "~no-such-user-here/m"], 1, "~no-such-user-here/m: no such directory"),
    (["bench", "--bandwidth", "-0.0"], 2, "argument --bandwidth: expected a finite number > 0, got '-0.0'"),
    (["bench", "--json", "/proc/x"], 2, "argument --json: '/proc/x': cannot be written"),
    (["bench", "--json", "notes.txt/x"], 2, "argument --json: 'notes.txt/x': cannot be written (Not a directory)"),
    (["bench", "--plot", "notes.txt"], 2, "argument --plot: 'notes.txt': expected a file name ending in .png"),
    (["bench", "--prompt-lengths", "600"], 2, "past the model's context of 512 tokens"),
    (["bench", "--prompt-lengths", "99999999999999"], 2, "past the model's context of 512 tokens"),
]


@pytest.mark.parametrize("argv, status, says", FOUND, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in FOUND])
def test_inputs_the_harness_found(argv, status, says, memorized, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hi\n"))
    command, rest = argv[0], argv[1:]
    model = [] if "--model" in rest else ["--model", str(memorized)]
    assert main([command, *model, *rest]) == status
    err = capsys.readouterr().err
    assert says in _one_error_line(err, command)


def test_a_destination_named_in_other_bytes_converts(tmp_path, memorized):
    name = b"mod\xe9le".decode("utf-8", "surrogateescape")  # as Python gets a Latin-1 name from argv
    assert main(["convert", "--hf-path", str(memorized), "--mlx-path", str(tmp_path / name), "--no-progress"]) == 0
    assert "# mod\ufffdle" in (tmp_path / name / "README.md").read_text()
