"""Every error path of the live server answers a 4xx with OpenAI's error object, never a 500 or a
traceback; API key, caps, CORS and the Host check of the stricter configuration."""

import json
import subprocess
import sys

import httpx
import pytest
from helpers.server_harness import CONTEXT, STRICT_KEY, shared

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server():
    return shared("server")


@pytest.fixture(scope="module")
def strict():
    return shared("strict_server")


AUTH = {"Authorization": f"Bearer {STRICT_KEY}"}


def _error(response: httpx.Response, status: int, *, param=None, code=None) -> dict:
    """The response is `status` with exactly OpenAI's error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def _post(server, path, body=None, *, content=None, headers=None):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2", b'{"messages": [}'])
def test_malformed_json(server, content):
    message = _error(_post(server, CHAT, content=content, headers={"Content-Type": "application/json"}), 400)["message"]
    assert "JSON" in message or "body" in message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "max_tokens": "10"}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "temperature": 3}, "temperature"),
        ({"messages": HELLO, "stream": "yes"}, "stream"),
        ({"messages": HELLO, "seed": 1.5}, "seed"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": HELLO, "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": HELLO, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"messages": "Hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, None),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ],
)
def test_wrong_types_and_values(server, body, param):
    error = _error(_post(server, CHAT, body), 400)
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": HELLO, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": HELLO, "logit_bias": {"32000": 1}}, "logit_bias"),
        ({"messages": HELLO, "logit_bias": {"5": 101}}, "logit_bias"),
        # The Mistral format wants user/assistant turns alternating, ending with the user.
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ],
)
def test_requests_the_model_cannot_serve(server, body, param):
    _error(_post(server, CHAT, body), 400, param=param)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [5, 32000]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_bad_completion_requests(server, body, param):
    _error(_post(server, "/v1/completions", body), 400, param=param)


def test_unknown_model(server):
    for path, body in [(CHAT, {"messages": HELLO}), ("/v1/completions", {"prompt": "hi"})]:
        error = _error(
            _post(server, path, {**body, "model": "../../etc/passwd"}), 404, param="model", code="model_not_found"
        )
        assert "../../etc/passwd" in error["message"]
    _error(httpx.get(server.url + "/v1/models/other-model"), 404, code="model_not_found")


def test_prompt_longer_than_the_context(server):
    long = "hello " * CONTEXT
    _error(_post(server, CHAT, {"messages": [{"role": "user", "content": long}]}), 400, code="context_length_exceeded")
    _error(_post(server, "/v1/completions", {"prompt": long}), 400, code="context_length_exceeded")


def test_unknown_routes_and_methods(server):
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    _error(httpx.get(server.url + CHAT), 405)


def test_bad_host_header_is_refused(server):
    """A page on evil.example whose name resolves to 127.0.0.1 (DNS rebinding) gets nothing."""
    _error(httpx.get(server.url + "/v1/models", headers={"Host": "evil.example"}), 400, code="invalid_host")
    port = server.url.rsplit(":", 1)[1]
    assert httpx.get(server.url + "/v1/models", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_api_key(strict):
    _error(httpx.get(strict.url + "/v1/models"), 401, code="invalid_api_key")
    _error(httpx.get(strict.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    _error(httpx.get(strict.url + "/v1/models", headers={"Authorization": STRICT_KEY}), 401)  # no scheme
    _error(_post(strict, CHAT, {"messages": HELLO}), 401)
    assert httpx.get(strict.url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert httpx.get(strict.url + "/health").status_code == 200  # liveness needs no key
    assert _post(strict, CHAT, {"messages": HELLO, "max_tokens": 2}, headers=AUTH).status_code == 200


def test_caps(strict):
    _error(_post(strict, CHAT, {"messages": HELLO, "max_tokens": 17}, headers=AUTH), 400, param="max_tokens")
    _error(_post(strict, CHAT, {"messages": HELLO, "max_completion_tokens": 17}, headers=AUTH), 400, param="max_tokens")
    five = [{"role": r, "content": "x"} for r in ("user", "assistant", "user", "assistant", "user")]
    _error(_post(strict, CHAT, {"messages": five}, headers=AUTH), 400, param="messages")
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    _error(_post(strict, CHAT, big, headers=AUTH), 413, code="request_too_large")
    # Without a Content-Length (chunked upload) the cap holds too.
    chunked = httpx.post(
        strict.url + CHAT,
        content=iter([json.dumps(big).encode()]),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    _error(chunked, 413, code="request_too_large")
    # No max_tokens: the server's cap is the default.
    r = _post(strict, CHAT, {"messages": HELLO, "temperature": 0, "logit_bias": {"2": -100}}, headers=AUTH)
    assert r.json()["usage"]["completion_tokens"] == 16 and r.json()["choices"][0]["finish_reason"] == "length"


def test_cors_only_when_asked(server, strict):
    preflight = {
        "Origin": "http://allowed.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    ok = httpx.options(strict.url + CHAT, headers=preflight)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://allowed.example"
    other = httpx.options(strict.url + CHAT, headers={**preflight, "Origin": "http://other.example"})
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in httpx.options(server.url + CHAT, headers=preflight).headers
    plain = httpx.get(server.url + "/v1/models", headers={"Origin": "http://allowed.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_openapi_document(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(doc["paths"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_mixtral", "serve", *args], capture_output=True, text=True, timeout=120
    )


def test_serve_refuses_bad_startup_options(server, tmp_path):
    """One line on stderr and exit status 1 (argparse: 2), no traceback."""
    missing = _serve("--model", str(tmp_path / "nothing-here"), "--port", "0")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert str(tmp_path / "nothing-here") in missing.stderr.splitlines()[-1]
    port = server.url.rsplit(":", 1)[1]
    taken = _serve("--model", str(shared("model_dir")), "--port", port)
    assert taken.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    template = _serve("--model", str(shared("model_dir")), "--port", "0", "--chat-template", "no-such-template")
    assert template.returncode == 1 and "--chat-template" in template.stderr.splitlines()[-1]
    bad_cap = _serve("--model", "x", "--max-tokens-cap", "0")
    assert bad_cap.returncode == 2 and "--max-tokens-cap" in bad_cap.stderr
