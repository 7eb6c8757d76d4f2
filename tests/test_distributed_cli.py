"""`mlx-mixtral generate/chat --distributed` under `mlx.launch` (2 ranks, ring backend over 127.0.0.1)
print what the single-process commands print; failures end with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.launch import run_launched
from helpers.memorized import TEXT_CONTINUATION, TEXT_PROMPT, TRANSCRIPT, memorized_4bit
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

from mlx_mixtral.tokenizer import load_tokenizer

TIMEOUT = 180


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    return memorized_4bit(tmp_path_factory)


def _single(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_mixtral", *args], capture_output=True, text=True, input=stdin, timeout=TIMEOUT
    )


def _launched(n: int, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return run_launched(n, "--", "-m", "mlx_mixtral", *args, "--distributed", input=stdin, timeout=TIMEOUT)


def test_generate_distributed_prints_the_memorized_continuation(memorized):
    tok = load_tokenizer(memorized)
    n = len(tok.encode(TEXT_CONTINUATION.strip(), add_special_tokens=False))
    args = ("generate", "--model", str(memorized), "--prompt", TEXT_PROMPT, "--max-tokens", str(n))
    run = _launched(2, *args)
    assert run.stdout == _single(*args).stdout, run.stderr
    assert run.stdout == TEXT_CONTINUATION
    assert "prompt: " in run.stderr and "Traceback" not in run.stderr


def test_chat_distributed_matches_one_process(memorized):
    turns = f"{TRANSCRIPT[0]['content']}\n/reset\n{TRANSCRIPT[0]['content']}\n{TRANSCRIPT[2]['content']}\n/quit\n"
    args = ("chat", "--model", str(memorized), "--max-tokens", "20")
    run = _launched(2, *args, stdin=turns)
    single = _single(*args, stdin=turns)
    assert single.returncode == 0, single.stderr
    assert run.stdout == single.stdout, run.stderr
    assert TRANSCRIPT[3]["content"] in run.stdout  # the second turn saw the first one


def test_sampling_without_a_seed_agrees_across_ranks(tmp_path):
    """Rank 0 picks the seed for everyone; ranks that drew their own keys would diverge and stop."""
    babbler = add_tokenizer(make_hf_checkpoint(tmp_path, vocab_size=32000, seed=5))
    run = _launched(
        2,
        "generate",
        "--model",
        str(babbler),
        "--prompt",
        "Hello",
        "--max-tokens",
        "12",
        "--temp",
        "1.0",
        "--top-k",
        "50",
    )
    assert "generation: 12 tokens" in run.stderr, run.stderr
    assert "diverged" not in run.stderr and "error" not in run.stderr


def test_missing_model_on_a_rank_is_one_line(tmp_path):
    run = _launched(2, "generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi")
    lines = [line for line in run.stderr.splitlines() if "mlx-mixtral generate: error:" in line]
    assert lines and all("nope" in line for line in lines), run.stderr
    assert "Traceback" not in run.stderr
