"""Schema fuzzing: schemathesis generates requests from the live server's OpenAPI document, valid
ones and ones that break it, and checks every response: no 5xx, the status codes, content types
and bodies the document declares, and invalid requests refused with a 4xx. (Schema-valid requests
may still be refused with a 400, e.g. a conversation the chat format does not allow, or a 413 past
the body-size cap, so schemathesis' check that valid data is accepted is left out.)"""

import pytest
from helpers.server_harness import STRICT_KEY, shared

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
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
