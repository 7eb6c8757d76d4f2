"""Schema fuzzing: schemathesis generates requests from the live server's OpenAPI document, valid
ones and ones that break it, and checks every response: no 5xx, the status codes, content types
and bodies the document declares, and invalid requests refused with a 4xx. (Schema-valid requests
may still be refused with a 400, e.g. a conversation the chat format does not allow, or a 413 past
the body-size cap, so schemathesis' check that valid data is accepted is left out.)"""

import json

import httpx
import pytest
from helpers.server_harness import STRICT_KEY, shared

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

AUTH = {"Authorization": f"Bearer {STRICT_KEY}"}


@pytest.fixture(scope="module")
def operations():
    # The strict server: max_tokens <= 16, so the valid generated requests stay quick.
    server = shared("strict_server")
    # A body past the size cap is refused with 413 before it is parsed, which is a correct refusal
    # of invalid data too.
    rejections = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": rejections}}})
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=config)
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in ops} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "GET /v1/models",
        "GET /health",
    }
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_documented_answers(operations, mode):
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # the GETs take no body and at most a free-form string: nothing to break

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case):
            case.call_and_validate(headers=AUTH, timeout=60, excluded_checks=[positive_data_acceptance])

        check()


# --- text that is not valid Unicode and numbers at the edges ------------------------------------------
# Raw JSON spellings that Python's json module and the JSON grammar disagree on, or that only the
# raw bytes can carry: lone surrogates, bad escapes, bytes that are not UTF-8, NaN/Infinity, floats
# that overflow to inf, integers past Python's 4300-digit conversion limit, deep nesting.
ODD_STRINGS = [
    '"\\ud800"',
    '"caf\\udce9"',
    '"\\udfff\\ud800x"',
    '"\\ud83d"',
    '"\\ud83d\\ude00"',
    '"\\u0000"',
    '"\\uffff"',
    '"\\x41"',
    '"\\u12"',
    '"\\q"',
    b'"caf\xe9"',
    b'"\xff\xfe"',
    b'"\xed\xa0\x80"',
]
ODD_NUMBERS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e308",
    "1e309",
    "-1e309",
    "-0.0",
    "-0",
    "1e-400",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "1" + "0" * 5000,
    "2.5",
]
ODD_SHAPES = ["[" * 5000 + "]" * 5000, "{}", "[]", "null", "true", '{"": {"": []}}']
ODD = ODD_STRINGS + ODD_NUMBERS + ODD_SHAPES
MARK = "\x00odd\x00"


def _paths(value, prefix=()):
    """Every place in a JSON value a mutation can go: the value itself and each member."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    return [_replace(v, rest, new) if i == head else v for i, v in enumerate(value)]


def _raw_body(body, path, odd) -> bytes:
    """`body` with the value at `path` spelled as the raw JSON `odd`."""
    text = json.dumps(_replace(body, path, MARK)).encode()
    return text.replace(json.dumps(MARK).encode(), odd if isinstance(odd, bytes) else odd.encode())


BASES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0.5},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2, "top_p": 0.9, "stop": ["x"], "seed": 1},
}


def _value_at(value, path):
    for part in path:
        value = value[part]
    return value


@st.composite
def odd_requests(draw):
    """A valid request with one value (or member name) replaced by an odd one of a kind that
    fits the place: odd strings where strings go, odd numbers where numbers go, odd shapes anywhere."""
    path = draw(st.sampled_from(sorted(BASES)))
    body = dict(BASES[path])
    extra = draw(st.sampled_from(["top_k", "min_p", "repetition_penalty", "logit_bias", "seed", "model", "user", None]))
    if extra == "logit_bias":
        body["logit_bias"] = {"13": 1.0}
    elif extra in ("model", "user"):
        body[extra] = "x"
    elif extra is not None:
        body[extra] = 1
    places = list(_paths(body))
    kind = draw(st.sampled_from(["string", "number", "shape", "name"]))
    if kind == "name":  # an odd string as a member name
        odd = draw(st.sampled_from([o for o in ODD_STRINGS if isinstance(o, str)]))
        return path, json.dumps(body).encode().replace(b'"max_tokens"', odd.encode(), 1), draw(st.booleans())
    if kind == "string":
        places = [p for p in places if isinstance(_value_at(body, p), str)]
        odd = draw(st.sampled_from(ODD_STRINGS))
    elif kind == "number":
        places = [p for p in places if isinstance(_value_at(body, p), int | float)]
        odd = draw(st.sampled_from(ODD_NUMBERS))
    else:
        odd = draw(st.sampled_from(ODD_SHAPES + ODD_STRINGS + ODD_NUMBERS))
    return path, _raw_body(body, draw(st.sampled_from(places)), odd), draw(st.booleans())


def test_odd_text_and_numbers_are_never_a_server_fault():
    server = shared("server")
    seen = []

    @given(request=odd_requests())
    @settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(request):
        path, raw, stream = request
        if stream:
            raw = raw[:-1] + b', "stream": true}' if raw.endswith(b"}") and raw != b"{}" else raw
        r = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
        seen.append(r.status_code)
        assert r.status_code < 500, (raw[:300], r.status_code, r.text[:300])
        assert "Traceback" not in r.text
        if r.headers["content-type"].startswith("application/json"):
            r.json()
        else:  # a stream: a fault after the 200 shows as an error event
            # Server-sent events end lines with LF only; str.splitlines would also cut at U+2028 and
            # the other Unicode line breaks a JSON string may hold unescaped.
            events = [json.loads(line[5:]) for line in r.text.split("\n") if line.startswith("data: {")]
            faults = [e["error"] for e in events if "error" in e and e["error"]["type"] == "server_error"]
            assert not faults, (raw[:300], faults)

    check()
    assert 200 in seen and 400 in seen  # both valid and refused requests were among them
