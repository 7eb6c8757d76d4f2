"""One rule for text that is not valid UTF-8, wherever it enters (argv, stdin, HTTP JSON, Python):
invalid sequences and lone surrogates become U+FFFD, and the command goes on. The expected token
ids come from SentencePiece itself encoding the replaced text."""

import json
import os
import subprocess
import sys

import httpx
import pytest
import sentencepiece
from helpers.memorized import TRANSCRIPT, memorized_4bit
from helpers.server_harness import shared
from helpers.tiny_models import mistral_tokenizer_path
from hypothesis import given
from hypothesis import strategies as st

from mlx_mixtral import text
from mlx_mixtral.tokenizer import load_tokenizer

SP = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_path("v1")))


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    return memorized_4bit(tmp_path_factory)


# --- the rule ------------------------------------------------------------------------------------
@given(st.binary(max_size=64))
def test_argv_bytes_become_the_text_those_bytes_decode_to(data):
    as_python_gives_it = data.decode("utf-8", errors="surrogateescape")  # what sys.argv holds
    assert text.argv_text(as_python_gives_it) == text.decode(data) == data.decode("utf-8", errors="replace")


@given(st.text(alphabet=st.characters(codec=None), max_size=32))
def test_clean_replaces_exactly_the_lone_surrogates(s):
    out = text.clean(s)
    out.encode("utf-8")  # always encodable
    assert len(out) == len(s)
    assert all(b == "\ufffd" if 0xD800 <= ord(a) <= 0xDFFF else a == b for a, b in zip(s, out))


def test_clean_json_cleans_keys_and_nested_strings():
    parsed = json.loads('{"caf\\udce9": ["x\\ud800", {"k": "ok \\ud83d\\ude00"}], "n": 1}')
    assert text.clean_json(parsed) == {"caf\ufffd": ["x\ufffd", {"k": "ok \U0001f600"}], "n": 1}


def test_tokenizer_encodes_lone_surrogates_as_the_replacement_character(memorized):
    tok = load_tokenizer(memorized)
    assert tok.encode("caf\udce9", add_special_tokens=False) == SP.encode("caf\ufffd")
    messages = [{"role": "user", "content": "caf\udce9"}]
    assert tok.apply_chat_template(messages) == tok.apply_chat_template([{"role": "user", "content": "caf\ufffd"}])


# --- the commands --------------------------------------------------------------------------------
LOCALES = [{"LC_ALL": "C.UTF-8"}, {"LC_ALL": "C"}]


def _run(args, stdin=b"", env=None):
    return subprocess.run(
        [sys.executable.encode(), b"-m", b"mlx_mixtral", *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def _prompt_tokens(stderr: bytes) -> int:
    line = stderr.decode().strip().splitlines()[-1]
    return int(line.split("prompt: ", 1)[1].split(" tokens", 1)[0])


@pytest.mark.parametrize("env", LOCALES, ids=["utf8-locale", "c-locale"])
@pytest.mark.parametrize("where", ["argv", "stdin"])
def test_generate_takes_a_prompt_that_is_not_utf8(memorized, where, env):
    raw = b"caf\xe9 \xff\xfe na\xc3\xafve \xe2\x82"  # a Latin-1 byte, two invalid ones, a valid one, a cut one
    prompt, stdin = (raw, b"") if where == "argv" else (b"-", raw)
    r = _run([b"generate", b"--model", str(memorized).encode(), b"--prompt", prompt, b"--max-tokens", b"2"], stdin, env)
    assert r.returncode == 0, r.stderr.decode()
    assert b"Traceback" not in r.stderr
    assert _prompt_tokens(r.stderr) == 1 + len(SP.encode(raw.decode("utf-8", "replace")))


def test_chat_goes_on_after_a_line_that_is_not_utf8(memorized):
    stdin = b"caf\xe9\n" + TRANSCRIPT[0]["content"].encode() + b"\n"
    r = _run([b"chat", b"--model", str(memorized).encode(), b"--max-tokens", b"12"], stdin)
    assert r.returncode == 0, r.stderr.decode()
    assert b"Traceback" not in r.stderr
    assert len(r.stdout.decode().splitlines()) == 2  # both lines were answered


# --- the server ----------------------------------------------------------------------------------
def _post_raw(server, body: str) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return httpx.post(server.url + "/v1/chat/completions", content=body.encode(), headers=headers, timeout=60)


def test_server_takes_a_lone_surrogate_as_the_replacement_character():
    server, ref = shared("server"), shared("reference")
    r = _post_raw(server, '{"messages": [{"role": "user", "content": "caf\\udce9"}], "max_tokens": 2}')
    assert r.status_code == 200, r.text
    replaced = [{"role": "user", "content": "caf\ufffd"}]
    assert r.json()["usage"]["prompt_tokens"] == len(ref.chat_ids(replaced))


@pytest.mark.parametrize(
    "body, status",
    [
        ('{"model": "caf\\udce9", "messages": [{"role": "user", "content": "hi"}]}', 404),
        ('{"messages": [{"role": "caf\\udce9", "content": "hi"}]}', 400),
        ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"], "max_tokens": 2}', 200),
    ],
)
def test_server_echoes_no_lone_surrogate(body, status):
    r = _post_raw(shared("server"), body)
    assert r.status_code == status, r.text
    r.json()


def test_server_decodes_a_body_that_is_not_utf8_by_the_same_rule():
    server, ref = shared("server"), shared("reference")
    body = b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}], "max_tokens": 2}'
    r = httpx.post(
        server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 200, r.text
    replaced = [{"role": "user", "content": "caf\ufffd \ufffd"}]
    assert r.json()["usage"]["prompt_tokens"] == len(ref.chat_ids(replaced))


@pytest.mark.parametrize(
    "value, says",
    [
        ("NaN", "NaN is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
        ("1e309", "1e309 is outside the range of a double"),
        ("1" + "0" * 5000, "an integer of 5001 digits is too long"),
        ("[" * 5000 + "]" * 5000, "the JSON is nested too deeply"),
    ],
    ids=["nan", "-infinity", "overflow", "long-int", "deep"],
)
def test_server_refuses_what_json_does_not_allow_and_says_what(value, says):
    r = _post_raw(shared("server"), '{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + value + "}")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == f"request body is not valid JSON ({says})"
