"""The `generate` and `chat` commands, run as a user runs them: subprocesses, and for the chat a
real pseudo-terminal (two turns, /reset, Ctrl-C mid-answer)."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from helpers.memorized import TEXT_CONTINUATION, TEXT_PROMPT, TRANSCRIPT, memorized_4bit
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

from mlx_mixtral.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    return memorized_4bit(tmp_path_factory)


@pytest.fixture(scope="module")
def babbler(tmp_path_factory):
    """Random weights with the real tokenizer: it talks (nonsense) until stopped."""
    return add_tokenizer(make_hf_checkpoint(tmp_path_factory.mktemp("babbler"), vocab_size=32000, seed=5))


def _run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_mixtral", *args], capture_output=True, text=True, input=stdin, timeout=300
    )


# --- generate ----------------------------------------------------------------------------------
def test_generate_prints_only_the_completion(memorized):
    tok = load_tokenizer(memorized)
    expected = TEXT_CONTINUATION  # the prompt's text continues, word-boundary space included
    n = len(tok.encode(TEXT_CONTINUATION.strip(), add_special_tokens=False))
    r = _run("generate", "--model", str(memorized), "--prompt", TEXT_PROMPT, "--max-tokens", str(n))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected  # nothing but the completion, not even a newline when piped
    stats = re.search(
        r"prompt: (\d+) tokens, [\d.]+ tok/s \| generation: (\d+) tokens, [\d.]+ tok/s \| "
        r"peak memory: [\d.]+ GB",
        r.stderr,
    )
    assert stats and int(stats[1]) == len(tok.encode(TEXT_PROMPT)) and int(stats[2]) == n


def test_generate_chat_applies_the_template_and_stops(memorized):
    r = _run(
        "generate",
        "--model",
        str(memorized),
        "--prompt",
        "-",
        "--chat",
        "--max-tokens",
        "50",
        "--stop",
        "experts",
        stdin=TRANSCRIPT[0]["content"],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "A sparse mixture of "  # the answer up to the stop string, which is not printed


@pytest.mark.parametrize(
    "args,code,words",
    [
        (["--model", "/no/such/model"], 1, "/no/such/model"),
        (["--temp", "-1"], 2, "temperature"),
        (["--max-tokens", "-5"], 2, "--max-tokens"),
    ],
)
def test_generate_errors_are_one_line(memorized, args, code, words):
    r = _run("generate", "--model", str(memorized), "--prompt", "hi", *args)
    assert r.returncode == code
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("mlx-mixtral generate: error:")


def test_chat_with_piped_input_answers_on_stdout_and_ends_at_eof(memorized):
    r = _run("chat", "--model", str(memorized), stdin=f"{TRANSCRIPT[0]['content']}\n{TRANSCRIPT[2]['content']}\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{TRANSCRIPT[1]['content']}\n{TRANSCRIPT[3]['content']}\n"  # prompts go to stderr


# --- chat in a pseudo-terminal --------------------------------------------------------------------
class Terminal:
    """A child process on a pty, read like a person watching the screen."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: become the CLI at once
            os.execv(sys.executable, [sys.executable, "-m", "mlx_mixtral", *args])
        self.seen = ""
        self.pos = 0  # what earlier expectations consumed

    def expect(self, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.seen, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {pattern!r} within {timeout}s; screen after last match:\n{self.seen[self.pos :][-3000:]}"
                )
            if select.select([self.fd], [], [], min(left, 1.0))[0]:
                try:
                    self.seen += os.read(self.fd, 65536).decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:  # the child closed the terminal
                    pass

    def type(self, text):
        os.write(self.fd, text.encode())

    def wait(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 65536).decode("utf-8", "replace")
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the chat did not exit; screen after last match:\n{self.seen[self.pos :][-3000:]}")

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def test_chat_two_turns_reset_and_quit(memorized):
    tok = load_tokenizer(memorized)
    first_prompt = len(tok.apply_chat_template(TRANSCRIPT[:1]))
    second_new = len(tok.apply_chat_template(TRANSCRIPT[:3])) - len(
        tok.apply_chat_template(TRANSCRIPT[:2], add_generation_prompt=False)
    )
    term = Terminal("chat", "--model", str(memorized), "--stats")
    try:
        term.expect(r"> $")
        term.type(TRANSCRIPT[0]["content"] + "\n")
        term.expect(re.escape(TRANSCRIPT[1]["content"]) + r"\n")
        term.expect(rf"prompt: {first_prompt} tokens")
        term.expect(r"> $")
        term.type(TRANSCRIPT[2]["content"] + "\n")
        term.expect(re.escape(TRANSCRIPT[3]["content"]) + r"\n")  # an answer only the first turn explains
        term.expect(rf"prompt: {second_new} tokens")  # the first turn was not recomputed
        term.expect(r"> $")
        term.type("/reset\n")
        term.expect(r"\(conversation cleared\)")
        term.type(TRANSCRIPT[0]["content"] + "\n")
        term.expect(re.escape(TRANSCRIPT[1]["content"]) + r"\n")
        term.expect(rf"prompt: {first_prompt} tokens")  # a fresh conversation again
        term.expect(r"> $")
        term.type("/quit\n")
        assert term.wait() == 0
    finally:
        term.kill()


def test_chat_ctrl_c_stops_the_answer_not_the_program(babbler, tmp_path):
    term = Terminal("chat", "--model", str(babbler), "--max-tokens", "100000")
    try:
        term.expect(r"> $")
        term.type("Tell me a very long story\n")
        term.expect(r"story\n")  # the terminal's echo of the question
        term.expect(r"(?s).{100}")  # the answer is streaming
        term.type("\x03")  # Ctrl-C, delivered by the terminal as SIGINT
        term.expect(r"\(stopped\)\n> $")
        term.type(f"/save {tmp_path / 'chat.safetensors'}\n")  # the partial answer is in the conversation
        term.expect(r"\(saved 2 messages.*\n> $")
        term.type("\x03")  # at the prompt Ctrl-C does not quit either
        term.expect(r"/quit or Ctrl-D to leave\)\n> $")
        term.type("/quit\n")
        assert term.wait() == 0
    finally:
        term.kill()
