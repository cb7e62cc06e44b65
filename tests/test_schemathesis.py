"""Property-based fuzzing of the live app from its own OpenAPI schema (schemathesis): no
request, valid or not, gets a 5xx, and every response matches what the schema promises
(status codes, content types, headers, bodies). Bounded: a fixed number of examples per
operation, each operation its own test."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

EXAMPLES_PER_OPERATION = 60
OPERATIONS = [("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/videos/{video_id}"),
              ("DELETE", "/v1/videos/{video_id}"), ("POST", "/v1/videos/{video_id}/cancel"),
              ("GET", "/v1/videos/{video_id}/content"), ("GET", "/v1/videos/{video_id}/events"),
              ("POST", "/v1/videos/sync"), ("POST", "/v1/videos/generations"), ("GET", "/v1/tasks/{task_id}"),
              ("GET", "/v1/usage"), ("GET", "/v1/models"), ("GET", "/healthz"), ("GET", "/readyz")]
# Creates whose valid requests may be refused by rules that span fields (size multiples,
# seconds x fps, the pixel and cost budgets), which JSON Schema cannot express.
CROSS_FIELD = {("POST", "/v1/videos"), ("POST", "/v1/videos/sync"), ("POST", "/v1/videos/generations")}
# A valid sync request holds its connection until a video is made (minutes for a large
# fuzzed size on this CPU): it is fuzzed with invalid requests only; tests/test_sync.py
# covers the valid ones.
INVALID_ONLY = {("POST", "/v1/videos/sync")}
# /readyz answers 503 by design when a stage does not answer its ping in time (documented in
# the schema, body checked against it): a state report, not a server failure. What it says
# is tested in tests/test_api.py. (Once, in a full suite, the shared Denoiser's ping timed out
# here while fuzzed creates loaded the 2 cores; see docs/reliability.md.)
STATE_REPORTS = {("GET", "/readyz")}


@pytest.fixture(scope="module")
def api_schema(service):
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    yield schema
    # Valid generated requests queued real jobs: cancel what is left so later tests run on
    # an idle cluster.
    client = service.client()
    for video in client.videos.list(limit=100):
        if video.status in ("queued", "in_progress"):
            client.post(f"/videos/{video.id}/cancel", cast_to=object)


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_operation_matches_its_schema_and_never_fails_with_5xx(api_schema, service, method, path):
    operation = api_schema[path][method]
    session = requests.Session()
    # A create can be schema-valid yet refused with a 400 naming the field: rules that span
    # fields (size a multiple of 16, seconds x fps a multiple of 4, the pixel budget) are not
    # expressible in JSON Schema. Every other check runs, on every operation.
    excluded = [positive_data_acceptance] if (method, path) in CROSS_FIELD else []
    if (method, path) in STATE_REPORTS:
        excluded.append(not_a_server_error)

    # Half valid requests, half invalid ones (wrong types, out-of-range values, missing fields).
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    if (method, path) in INVALID_ONLY:
        cases = operation.as_strategy(GenerationMode.NEGATIVE)

    @given(case=cases)
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def fuzz(case):
        case.call_and_validate(base_url=service.url, session=session, excluded_checks=excluded, timeout=30)

    fuzz()
