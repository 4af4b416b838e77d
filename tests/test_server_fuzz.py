"""Schemathesis fuzzes every operation of `/openapi.json` on a real server: no 5xx, and every
response (status, content type, body) matches the published schema.

Bounded for CI: a few dozen examples per operation, and generation requests are capped at a few
tokens (an unbounded max_tokens would spend minutes generating on a CPU while testing nothing
more).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.generation.modes import GenerationMode

from tests.server_helpers import API_KEY

MAX_EXAMPLES = 20
MAX_GENERATED_TOKENS = 4


def _cap_generation(body: object) -> None:
    """Keep fuzzed generation requests short; other fields stay as generated."""
    if not isinstance(body, dict) or not ("prompt" in body or "messages" in body):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        null = value is None and key in body  # null means "the rest of the context"
        big = isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_GENERATED_TOKENS
        if null or big:
            body[key] = MAX_GENERATED_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_GENERATED_TOKENS  # chat's default is the rest of the context


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


# Schemathesis' own pytest plugin does not work with pytest 9 yet, so each operation gets a plain
# Hypothesis test built from the operation's strategy (the same cases `st run` would send).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_fuzz(lserve_server, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(lserve_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions", "GET /health"}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not op.body:
            continue  # no body and no parameters: there is no invalid request to make

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            _cap_generation(case.body)
            case.call_and_validate(headers=headers, timeout=60, checks=CHECKS)

        try:
            fuzz()
        except Exception as exc:
            raise AssertionError(f"{op.label} ({mode.value}): {exc}") from exc
