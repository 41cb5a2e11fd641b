"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis over /openapi.json), against a
real server on 127.0.0.1: whatever a client sends, no route answers 5xx or hangs, and the server still serves
afterwards.

Bounded to run in a few minutes on two cores: a handful of examples per route, and a server whose work limit
(--max-work) admits only 64x64 images of a few steps, so the generations the fuzzer gets through cost milliseconds.
"""
import pytest
from hypothesis import HealthCheck, settings

from oracles import import_oracle
from webui_server import start_server

schemathesis = import_oracle("schemathesis")
httpx = import_oracle("httpx")

EXAMPLES_PER_ROUTE = 12
SECONDS_PER_REQUEST = 60  # a hang fails the test instead of stalling the suite


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("fuzz"), max_work=64 * 64 * 4 * 2)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_request_gets_a_server_error(case, server):
    response = case.call(base_url=server.url, timeout=SECONDS_PER_REQUEST)
    assert response.status_code < 500, (
        f"{case.method} {case.path} answered {response.status_code}: {response.text[:500]}\n"
        f"reproduce with: {case.as_curl_command()}")


def test_the_server_still_serves_after_the_fuzzing(server):
    with httpx.Client(base_url=server.url, timeout=SECONDS_PER_REQUEST) as client:
        assert client.get("/sdapi/v1/progress").status_code == 200
        body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1,
                "override_settings": {"CLIP_stop_at_last_layers": 1}}
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 1
