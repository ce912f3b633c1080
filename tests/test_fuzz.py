"""Property-based fuzzing of every route from the host's own OpenAPI description.

Malformed JSON, wrong types, huge and negative numbers, unicode, empty and
oversized bodies: no 5xx, no crash, every error JSON with a code.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from llm_nb.config import Settings
from llm_nb.host.app import create_app
from llm_nb.host.http import is_v2_path
from llm_nb.host.openapi import LEFT_OUT, SAME_AS, build_openapi

from .conftest import start_host

SCHEMA = schemathesis.openapi.from_dict(build_openapi())
EXAMPLES = 60


@pytest.fixture(scope="module")
def fuzz_host(tmp_path_factory):
    host = start_host(tmp_path_factory.mktemp("fuzz"), LLM_NB_MAX_BODY="256KiB")
    # A small context bounds how long any generated request can run.
    host.client().load("smollm2", options={"n_ctx": 256}, keep_alive=-1)
    yield host
    host.stop()


def served_routes(tmp_path) -> set[tuple[str, str]]:
    """(method, path) of every route the real host app registers, as its router holds them."""
    app = create_app(Settings(), "key", tmp_path, {"url": "http://127.0.0.1:9", "pid": 1, "started": 0.0})
    served = set()
    for route in app.router.routes():
        method, path = route.method.lower(), route.resource.canonical
        if method == "head":  # aiohttp answers HEAD beside every GET
            continue
        # A catch-all route (a deployment's API) serves GET and POST and answers 405 to the rest.
        served.update((m, SAME_AS.get(path, path)) for m in (("get", "post") if method == "*" else (method,)))
    return served


def test_every_route_the_host_serves_is_in_its_openapi_document(tmp_path):
    # What the document leaves out is neither fuzzed nor known to clients generated from it.
    documented = {(method, path) for path, operations in build_openapi()["paths"].items() for method in operations}
    served = served_routes(tmp_path)
    assert sorted(served - documented - LEFT_OUT) == [], "routes missing from llm_nb/host/openapi.py ROUTES"
    assert sorted(documented - served) == [], "documented routes that the host does not serve"


def check_answer(host, response) -> None:
    assert response.status_code < 500 or response.status_code in (502, 503, 507), (
        f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        body = response.json()
        if is_v2_path(urlsplit(response.request.url).path):  # KServe v2: the message as a string
            assert isinstance(body["error"], str) and body["error"] and body["code"]
        else:
            assert body["error"]["code"] and body["error"]["message"]
    assert requests.get(host.url + "/health", timeout=5).ok, "the host died"


@SCHEMA.exclude(path="/api/models/load").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_5xx(case, fuzz_host):
    response = case.call(base_url=fuzz_host.url, headers={"Authorization": f"Bearer {fuzz_host.key}"}, timeout=60)
    check_answer(fuzz_host, response)


@SCHEMA.include(path="/api/models/load").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_loads_are_answered_cleanly(case, fuzz_host):
    # Valid loads would start real workers for random names; keep to the refusals.
    if isinstance(case.body, dict) and not case.body.get("model"):
        case.body["model"] = "/nonexistent/" + json.dumps(case.body)[:40]
    response = case.call(base_url=fuzz_host.url, headers={"Authorization": f"Bearer {fuzz_host.key}"}, timeout=60)
    check_answer(fuzz_host, response)


RAW_BODIES = [
    b"",
    b"null",
    b"\xff\xfe\x00garbage",
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xe2\x98\x83 \xf0\x9f\x98\x80"}], "max_tokens": 2}',
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}',
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}',
    b'{"model": "smollm2", "input": "x", "max_tokens": Infinity, "keep_alive": NaN, "scope": [NaN], "ttl": NaN}',
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "seed": 99999999999999999999999999}',
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stop": ["' + b"s" * 1000 + b'"]}',
    b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "smollm2", "messages": "' + b"x" * 300_000 + b'"}',
]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/api/models/unload",
        "/v2/models/smollm2/infer",
        "/api/token",
        "/api/deployments/deploy",
        "/api/deployments/undeploy",
    ],
)
@pytest.mark.parametrize("body", RAW_BODIES, ids=range(len(RAW_BODIES)))
def test_hand_made_bad_bodies_get_json_errors(fuzz_host, path, body):
    response = requests.post(
        fuzz_host.url + path, data=body, headers={"Authorization": f"Bearer {fuzz_host.key}"}, timeout=60
    )
    check_answer(fuzz_host, response)
