"""Every script in examples/ runs, as a user would run it, and says what the library says."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.memorized import TEXT_CONTINUATION, TEXT_PROMPT, TRANSCRIPT, memorized_4bit

from mlx_mixtral import ChatSession, generate, load

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args, stdin=None):
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, input=stdin, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    return memorized_4bit(tmp_path_factory)


def test_quickstart_offline_builds_converts_generates_and_chats(tmp_path):
    r = _run("quickstart_offline.py", "--out", str(tmp_path))
    model_dir = tmp_path / "mixtral-tiny-4bit"
    assert (tmp_path / "mixtral-tiny-hf" / "tokenizer.model").is_file()
    model, tokenizer = load(model_dir)
    assert model.args.quantization["bits"] == 4
    # What it printed is what the library gives for the same model and inputs.
    expected = generate(model, tokenizer, "The capital of France is", max_tokens=16)
    assert f"generate: The capital of France is{expected}\n" in r.stdout
    chat = ChatSession(model, tokenizer, system="You are concise.", max_tokens=16)
    for question in ["Hello, who are you?", "What can you do?"]:
        assert f"chat: {question} -> {''.join(chat.send(question))}\n" in r.stdout
    assert f"--model {model_dir}" in r.stderr


def test_generate_from_python(memorized):
    r = _run("generate_from_python.py", "--model", str(memorized), "--prompt", TEXT_PROMPT, "--max-tokens", "15")
    assert r.stdout.startswith(f"[greedy] {TEXT_PROMPT}{TEXT_CONTINUATION}\n")
    assert "[same seed again is identical] True" in r.stdout
    assert len(re.findall(r"^ +'\S+' +-?\d\.\d{3} +top: ", r.stdout, re.M)) == 5  # 5 logprob lines
    assert "finish: length" in r.stderr


def test_assistant_remembers_across_runs(memorized, tmp_path):
    session = tmp_path / "assistant.safetensors"
    first = _run(
        "assistant.py", "--model", str(memorized), "--session", str(session), stdin=TRANSCRIPT[0]["content"] + "\n"
    )
    assert first.stdout == TRANSCRIPT[1]["content"] + "\n"
    # A second run continues the saved conversation (asked alone, this model answers otherwise), and
    # only the new question is prefilled.
    second = _run(
        "assistant.py", "--model", str(memorized), "--session", str(session), stdin=TRANSCRIPT[2]["content"] + "\n"
    )
    assert second.stdout == TRANSCRIPT[3]["content"] + "\n"
    assert "(continuing 2 messages" in second.stderr
    new_tokens = int(re.search(r"prefilled (\d+) new tokens", second.stderr)[1])
    model, tokenizer = load(memorized)
    full = tokenizer.apply_chat_template(TRANSCRIPT[:3])
    history = tokenizer.apply_chat_template(TRANSCRIPT[:2], add_generation_prompt=False)
    assert new_tokens == len(full) - len(history)
