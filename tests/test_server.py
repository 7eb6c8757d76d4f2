"""The OpenAI-compatible server, live on 127.0.0.1, through the official `openai` client.

Answers are compared with transformers' greedy generate on the same tiny checkpoint, token ids with
mistral-common's Mixtral tokenizer, and text with SentencePiece's decoder.
"""

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers.server_harness import EOS, LiveServer, leave_mid_stream, shared, wait_idle

from mlx_mixtral.chat import common_prefix_length

openai = pytest.importorskip("openai")

USER1 = "Hello, who are you?"
USER2 = "Tell me more about it."


@pytest.fixture(scope="module")
def server():
    return shared("server")


@pytest.fixture(scope="module")
def ref():
    return shared("reference")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, server, messages, **kwargs):
    return client.chat.completions.create(model=server_model(server), messages=messages, temperature=0, **kwargs)


def server_model(server):
    return server.health()["model"]


def _stream_text(stream):
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, text


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server_model(server)]
    assert client.models.retrieve(models[0].id).id == models[0].id
    assert server.health()["status"] == "ok"


def test_chat_non_streaming_equals_transformers(client, server, ref):
    messages = [{"role": "user", "content": USER1}]
    ids = ref.chat_ids(messages)
    tokens, text = ref.greedy(ids, 20)
    r = _chat(client, server, messages, max_tokens=20)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("stop" if len(tokens) < 20 else "length")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(tokens) + (len(tokens) < 20)  # EOS counts as generated
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client, server, ref):
    messages = [{"role": "user", "content": "Stream me a story"}]
    whole = _chat(client, server, messages, max_tokens=24)
    chunks, text = _stream_text(
        _chat(client, server, messages, max_tokens=24, stream=True, stream_options={"include_usage": True})
    )
    assert text == whole.choices[0].message.content == ref.greedy(ref.chat_ids(messages), 24)[1]
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_content_parts_are_joined_as_mistral_common_joins_them(client, server, ref):
    """Text parts in several messages (system included): the prompt is mistral-common's token ids
    for the same parts, and the answer transformers' greedy answer to them."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second."}]},
    ]
    ids = ref.chat_ids(messages)
    assert ids == ref.chat_ids([{"role": "system", "content": "Be brief.\n\nBe kind."},
                                {"role": "user", "content": "First part.\n\nSecond."}])  # fmt: skip
    r = _chat(client, server, messages, max_tokens=8)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == ref.greedy(ids, 8)[1]


def test_stop_strings(client, server):
    messages = [{"role": "user", "content": "Count with me"}]
    full = _chat(client, server, messages, max_tokens=24).choices[0].message.content
    # A stop string from the middle of the answer that does not occur earlier in it.
    start = next(i for i in range(6, len(full) - 3) if full.find(full[i : i + 3]) == i)
    stop = full[start : start + 3]
    cut = _chat(client, server, messages, max_tokens=24, stop=["never-there", stop])
    assert cut.choices[0].message.content == full[:start]
    assert cut.choices[0].finish_reason == "stop"
    _, streamed = _stream_text(_chat(client, server, messages, max_tokens=24, stop=stop, stream=True))
    assert streamed == full[:start]


def test_multi_turn_reuses_the_prefix_cache(client, server, ref):
    """The second turn resends turn one; only the new tokens are prefilled, and the answer is the
    one transformers gives for the whole conversation."""
    turn1 = [{"role": "user", "content": USER1}]
    first = _chat(client, server, turn1, max_tokens=12)
    answer1 = first.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": answer1}, {"role": "user", "content": USER2}]
    second = _chat(client, server, turn2, max_tokens=12)

    ids1, ids2 = ref.chat_ids(turn1), ref.chat_ids(turn2)
    gen1, _ = ref.greedy(ids1, 12)
    assert second.usage.prompt_tokens == len(ids2)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The cache holds turn one's prompt and answer (the answer's last token may not have been fed).
    held = ids1 + gen1 + ([EOS] if len(gen1) < 12 else [])
    assert common_prefix_length(held[:-1], ids2) <= cached <= common_prefix_length(held, ids2)
    assert cached >= len(ids1)
    prefilled = second.usage.prompt_tokens - cached
    assert prefilled <= len(ids2) - len(ids1)
    assert second.choices[0].message.content == ref.greedy(ids2, 12)[1]


def test_logprobs_equal_transformers(client, server, ref):
    messages = [{"role": "user", "content": "Give me logprobs"}]
    r = _chat(client, server, messages, max_tokens=8, logprobs=True, top_logprobs=3)
    ids = ref.chat_ids(messages)
    tokens, _ = ref.greedy(ids, 8)
    content = r.choices[0].logprobs.content
    assert [ref.sp.id_to_piece(t).replace("\u2581", " ") for t in tokens] == [c.token for c in content][: len(tokens)]
    expected = ref.logprobs(ids, tokens)
    assert [c.logprob for c in content][: len(tokens)] == pytest.approx(expected, abs=2e-3)
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)  # greedy: the chosen one is best
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    chunks, _ = _stream_text(_chat(client, server, messages, max_tokens=8, logprobs=True, top_logprobs=3, stream=True))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [lp.model_dump() for lp in streamed] == [lp.model_dump() for lp in content]


def test_completions_endpoint_equals_transformers(client, server, ref):
    prompt = "The capital of France is"
    tokens, _ = ref.greedy(ref.text_ids(prompt), 10)
    text = ref.continuation_text(ref.text_ids(prompt), tokens)
    r = client.completions.create(model=server_model(server), prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.usage.prompt_tokens == len(ref.text_ids(prompt))
    streamed = client.completions.create(
        model=server_model(server), prompt=ref.text_ids(prompt), max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_completion_logprobs_equal_transformers(client, server, ref):
    """The legacy endpoint's logprobs: each token's text, logprob, best alternatives and its offset
    in the completion text, streamed or not."""
    ids = ref.text_ids("The capital of France is")
    tokens, _ = ref.greedy(ids, 8)
    r = client.completions.create(model=server_model(server), prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    n = len(tokens)
    assert lp.tokens[:n] == [ref.sp.id_to_piece(t).replace("\u2581", " ") for t in tokens]
    assert lp.token_logprobs[:n] == pytest.approx(ref.logprobs(ids, tokens), abs=2e-3)
    assert lp.text_offset[:n] == [len(ref.continuation_text(ids, tokens[:i])) for i in range(n)]
    for top, logprob in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy: the best one
    streamed = client.completions.create(
        model=server_model(server), prompt=ids, max_tokens=8, temperature=0, logprobs=2, stream=True
    )
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [(t, o) for p in parts for t, o in zip(p.tokens, p.text_offset)] == list(zip(lp.tokens, lp.text_offset))
    assert [x for p in parts for x in p.token_logprobs] == lp.token_logprobs


def test_seeded_sampling_is_repeatable(client, server):
    messages = [{"role": "user", "content": "Surprise me"}]

    def run(seed):
        return (
            client.chat.completions.create(
                model=server_model(server), messages=messages, max_tokens=12, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_twenty_concurrent_streams_match_a_single_request(client, server):
    messages = [{"role": "user", "content": "Everyone asks the same thing"}]
    single = _chat(client, server, messages, max_tokens=16).choices[0].message.content
    before = server.health()

    def one(_):
        return _stream_text(_chat(client, server, messages, max_tokens=16, stream=True))[1]

    with ThreadPoolExecutor(20) as pool:
        texts = list(pool.map(one, range(20)))
    assert texts == [single] * 20
    after = server.health()
    assert after["completed"] - before["completed"] == 20
    assert after["failed"] == before["failed"] and not after["busy"] and after["queued"] == 0


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_dropped_stream_frees_the_worker(server, endpoint, capsys):
    """A client that leaves mid-stream cancels its generation: the worker goes idle long before
    the 2000 tokens it asked for (~10 s of generation here) and serves the next request."""
    before = server.health()
    body = {"max_tokens": 2000, "temperature": 0, "stream": True, "logit_bias": {str(EOS): -100}}
    if endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "Talk forever"}]
    else:
        path, body["prompt"] = "/v1/completions", "Once upon a time"
    left = leave_mid_stream(server.url, path, body)
    after = wait_idle(server.url, before["cancelled"] + 1)
    with capsys.disabled():
        print(
            f"\n[{endpoint}] worker free {time.monotonic() - left:.3f} s after the client left "
            f"({after['generated_tokens'] - before['generated_tokens']} tokens generated)"
        )
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]
    assert after["generated_tokens"] - before["generated_tokens"] < 1000
    quick = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 2


def test_dropped_non_streaming_request_frees_the_worker(server):
    """A client that gives up on a non-streaming answer cancels it too (noticed while waiting)."""
    before = server.health()
    body = {"prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "logit_bias": {str(EOS): -100}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    after = wait_idle(server.url, before["cancelled"] + 1)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert after["generated_tokens"] - before["generated_tokens"] < 4000


def test_sigterm_stops_a_busy_server(server):
    """Ctrl-C/SIGTERM while a generation runs: the stream ends with an error event, and the process
    exits without waiting out uvicorn's graceful-shutdown timeout (which would log a traceback)."""
    own = LiveServer(shared("model_dir"))
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "stream": True, "logit_bias": {str(EOS): -100}}
        with httpx.Client(timeout=60) as http, http.stream("POST", own.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            own.proc.terminate()
            rest = [json.loads(line[5:]) for line in lines if line.startswith("data:") and "[DONE]" not in line]
        assert rest[-1]["error"]["code"] == "shutting_down"
        assert own.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert "Traceback" not in "".join(own.log), "".join(own.log)
    finally:
        own.stop()
