"""Property-based requests generated from the server's own OpenAPI document (schemathesis) against the real
server: whatever a client sends (tools, n, logprobs, raw completions included), the answer is never a 5xx; for
ChatGLM2 and for ChatGLM3, whose tool messages take another path."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error


@pytest.fixture(scope="module", params=["v2", pytest.param("v3", marks=pytest.mark.slow)])
def live_schema(request, exports, served, server_factory):
    models = served(exports.get("full", request.param), name="glm")
    with server_factory(models, max_prompt_tokens=64, max_tokens_limit=8, default_max_tokens=8) as running:
        yield schemathesis.openapi.from_url(f"{running.url}/openapi.json")


def test_no_generated_request_gets_a_server_error(live_schema):
    operations = [result.ok() for result in live_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/", "/v1/models",
                                              "/readyz"}
    for operation in operations:

        @given(case=operation.as_strategy(), served_name=st.booleans())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def no_server_error(case, served_name):
            if served_name and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "glm"  # half the requests reach generation instead of the 404
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        no_server_error()
