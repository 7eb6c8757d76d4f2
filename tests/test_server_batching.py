"""The server decoding concurrent requests together (--max-batch): every stream gets what it gets
alone (transformers' greedy tokens), whatever the others do, fail at or leave."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers.server_harness import EOS, LiveServer, leave_mid_stream, shared, wait_idle

openai = pytest.importorskip("openai")

QUESTIONS = ["Hello, who are you?", "Name a colour", "What is two plus two?", "Tell me a story about a cat"]


@pytest.fixture(scope="module")
def server():
    live = LiveServer(shared("model_dir"), "--max-batch", "4", "--prompt-cache-size", "2", "--served-model-name", "m")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def ref():
    return shared("reference")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _messages(i):
    return [{"role": "user", "content": f"{QUESTIONS[i % 4]} (request {i})"}]


def _stream(client, messages, max_tokens):
    stream = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=max_tokens, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_sixteen_concurrent_openai_streams_with_max_batch_4(client, server, ref):
    """Distinct prompts of different lengths and answer lengths; four decode at a time."""
    lengths = [6 + 3 * (i % 5) for i in range(16)]
    want = [ref.greedy(ref.chat_ids(_messages(i)), n)[1] for i, n in enumerate(lengths)]
    before = server.health()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: _stream(client, _messages(i), lengths[i]), range(16)))
    assert got == want
    after = server.health()
    assert after["completed"] - before["completed"] == 16
    assert after["failed"] == before["failed"] and not after["busy"] and after["queued"] == 0


def test_a_bad_request_fails_alone_while_others_stream(client, server, ref):
    want = ref.greedy(ref.chat_ids(_messages(1)), 24)[1]
    results = {}

    def good():
        results["good"] = _stream(client, _messages(1), 24)

    thread = threading.Thread(target=good)
    thread.start()
    bad = [
        httpx.post(server.url + "/v1/completions", json={"prompt": [1, 10**6], "max_tokens": 3}, timeout=30),
        httpx.post(server.url + "/v1/chat/completions", json={"messages": [], "max_tokens": 3}, timeout=30),
        httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "temperature": -2}, timeout=30),
    ]
    thread.join()
    assert [r.status_code for r in bad] == [400, 400, 400]
    assert all(r.json()["error"]["message"] for r in bad)
    assert results["good"] == want


def test_a_client_that_leaves_frees_its_row_and_others_are_unchanged(client, server, ref):
    want = [ref.greedy(ref.chat_ids(_messages(i)), 30)[1] for i in (2, 3)]
    before = server.health()
    got = {}

    def run(i):
        got[i] = _stream(client, _messages(i), 30)

    threads = [threading.Thread(target=run, args=(i,)) for i in (2, 3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    body = {"max_tokens": 2000, "temperature": 0, "stream": True, "logit_bias": {str(EOS): -100}}
    body["messages"] = [{"role": "user", "content": "Talk forever"}]
    leave_mid_stream(server.url, "/v1/chat/completions", body)
    for t in threads:
        t.join()
    after = wait_idle(server.url, before["cancelled"] + 1)
    assert [got[2], got[3]] == want
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 1000


def test_a_speculating_server_serves_in_turn_with_the_same_tokens(ref):
    """--prompt-lookup: requests run one at a time (the default batch becomes 1), greedy answers
    stay transformers', and a json_schema request, which cannot speculate, still runs."""
    live = LiveServer(shared("model_dir"), "--prompt-lookup", "2", "--served-model-name", "m")
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        want = [ref.greedy(ref.chat_ids(_messages(i)), 20)[1] for i in range(3)]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda i: _stream(client, _messages(i), 20), range(3)))
        assert got == want
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        answer = client.chat.completions.create(
            model="m",
            messages=_messages(0),
            max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        )
        assert answer.choices[0].message.content.startswith("{")
        assert live.health()["failed"] == 0
    finally:
        live.stop()
