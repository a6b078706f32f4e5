"""Property-based requests from the server's own OpenAPI schema (schemathesis): whatever a
client sends, the server answers without a 5xx."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")
schemathesis = pytest.importorskip("schemathesis", reason="the schema run needs schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from vlm_engine.testing.server_process import ServerProcess  # noqa: E402

API_KEY = "sk-schema"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A short context keeps every generated request small: no output passes 64 tokens.
    process = ServerProcess(
        ["--api-key", API_KEY, "--served-model-name", "demo", "--max-model-len", "64"],
        tmp_path_factory.mktemp("schema") / "server.log",
    )
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_makes_a_server_error(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "demo"  # past the model check, into sampling and the engine
    response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
