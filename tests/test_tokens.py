"""Session tokens: short-lived, signed, scoped; the host key never leaves the connection file."""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests

from llm_nb import consume
from llm_nb.catalog import smollm2_path
from llm_nb.errors import AuthenticationError

from .conftest import start_host
from .test_deployments import ECHO, make_deployment


def bearer(credential: str) -> dict:
    return {"Authorization": f"Bearer {credential}"}


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest.fixture
def deployed(host, tmp_path):
    client = host.client()
    client.load("smollm2")
    client.deploy("echo", make_deployment(tmp_path / "echo", ECHO))
    client.deploy("other", make_deployment(tmp_path / "other", ECHO))
    return host


def test_a_token_opens_only_the_names_in_its_scope(deployed):
    host = deployed
    issued = host.client().session_token(["echo", "smollm2"], ttl=120)
    token = issued["token"]
    assert issued["scope"] == ["echo", "smollm2"] and issued["expires_in"] == 120
    assert host.key not in token and host.key not in json.dumps(claims(token))

    assert requests.post(f"{host.url}/models/echo/", json={"a": 1}, headers=bearer(token), timeout=30).ok
    meta = requests.get(f"{host.url}/models/echo/?get_meta=true", headers=bearer(token), timeout=30)
    assert meta.ok and meta.json()["name"] == "echo"
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert requests.post(f"{host.url}/v1/chat/completions", json=chat, headers=bearer(token), timeout=60).ok
    assert [
        m["id"] for m in requests.get(f"{host.url}/v1/models", headers=bearer(token), timeout=30).json()["data"]
    ] == ["smollm2"]
    listed = requests.get(f"{host.url}/api/deployments", headers=bearer(token), timeout=30).json()["deployments"]
    assert [d["name"] for d in listed] == ["echo"]

    for method, path, body in [
        ("POST", "/models/other/", {"a": 1}),
        ("GET", "/models/other/?get_meta=true", None),
    ]:
        refused = requests.request(method, host.url + path, json=body, headers=bearer(token), timeout=30)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"

    narrow = host.client().session_token("echo")["token"]
    refused = requests.post(f"{host.url}/v1/chat/completions", json=chat, headers=bearer(narrow), timeout=30)
    assert refused.status_code == 403 and "smollm2" in refused.json()["error"]["message"]


def test_a_token_sees_its_models_in_status_and_catalog_but_not_the_host(deployed):
    host = deployed
    for scope in (["smollm2"], ["*"]):
        token = host.client().session_token(scope)["token"]
        status = requests.get(f"{host.url}/api/status", headers=bearer(token), timeout=30).json()
        assert [m["name"] for m in status["models"]] == ["smollm2"]
        assert not {"pid", "url", "budget_bytes", "used_bytes"} & set(status), status
        assert not {"path", "log_file", "worker_pid", "leases", "info"} & set(status["models"][0])
        catalog = requests.get(f"{host.url}/api/catalog", headers=bearer(token), timeout=30).json()["models"]
        assert list(catalog) == ["smollm2"] and "path" not in catalog["smollm2"]
        assert smollm2_path() not in json.dumps([status, catalog])
    narrow = host.client().session_token("echo")["token"]
    assert requests.get(f"{host.url}/api/status", headers=bearer(narrow), timeout=30).json()["models"] == []
    assert requests.get(f"{host.url}/api/catalog", headers=bearer(narrow), timeout=30).json()["models"] == {}
    # The host key still sees everything.
    whole = host.client().status()
    assert whole["pid"] == host.process.pid and whole["models"][0]["path"] == smollm2_path()


def test_a_token_sees_its_deployments_in_status_without_paths_or_pids(deployed, tmp_path):
    host = deployed
    token = host.client().session_token(["echo"])["token"]
    status = requests.get(f"{host.url}/api/status", headers=bearer(token), timeout=30).json()
    (echo,) = status["deployments"]
    assert set(echo) == {
        "name",
        "version",
        "engine",
        "replicas",
        "state",
        "created",
        "requests_served",
        "errors",
        "in_flight",
        "waiting",
        "max_concurrency",
        "rss_bytes",
        "ray",
    }
    assert (echo["name"], echo["engine"], echo["state"], echo["replicas"]) == (
        "echo",
        "local",
        "ready",
        {"target": 1, "running": 1},
    )
    assert str(tmp_path) not in json.dumps(status) and host.url not in json.dumps(status)
    # The deployments' own routes show a token the same view.
    listed = requests.get(f"{host.url}/api/deployments", headers=bearer(token), timeout=30).json()["deployments"]
    meta = requests.get(f"{host.url}/models/echo/?get_meta=true", headers=bearer(token), timeout=30).json()
    assert [set(d) for d in listed] == [set(echo)]
    assert set(meta) == set(echo) and str(tmp_path) not in json.dumps([listed, meta])
    everything = host.client().status()["deployments"]
    assert [d["name"] for d in everything] == ["echo", "other"]
    assert {"folder", "files_dir", "worker_pid", "log_file", "api_url"} <= set(everything[0])


def test_tokens_open_no_admin_route_and_cannot_mint_tokens(deployed, tmp_path):
    host = deployed
    token = host.client().session_token(["*"])["token"]
    assert requests.post(f"{host.url}/models/other/", json={}, headers=bearer(token), timeout=30).ok
    for path, body in [
        ("/api/token", {"scope": ["echo"]}),
        ("/api/deployments/deploy", {"name": "x", "folder": str(tmp_path)}),
        ("/api/deployments/undeploy", {"name": "echo"}),
        ("/api/models/load", {"model": "smollm2"}),
        ("/api/models/unload", {"model": "smollm2", "force": True}),
        ("/api/shutdown", {}),
    ]:
        refused = requests.post(host.url + path, json=body, headers=bearer(token), timeout=30)
        assert refused.status_code == 403, path
    assert host.process.poll() is None and len(host.client().deployments()) == 2


def test_expired_forged_and_foreign_tokens_are_refused(deployed, tmp_path):
    host = deployed
    short = host.client().session_token(["echo"], ttl=1)["token"]
    assert requests.post(f"{host.url}/models/echo/", json={}, headers=bearer(short), timeout=30).ok
    time.sleep(2.1)
    expired = requests.post(f"{host.url}/models/echo/", json={}, headers=bearer(short), timeout=30)
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "invalid_api_key"

    good = host.client().session_token(["echo"])["token"]
    header, payload, signature = good.split(".")
    widened = dict(claims(good), scope=["*"])
    forged_payload = base64.urlsafe_b64encode(json.dumps(widened).encode()).decode().rstrip("=")
    for forged in (f"{header}.{forged_payload}.{signature}", good[:-4] + "AAAA", "not-a-token"):
        assert requests.post(f"{host.url}/models/echo/", json={}, headers=bearer(forged), timeout=30).status_code == 401

    other = start_host(tmp_path / "other")  # another host (another secret) does not honour this host's tokens
    try:
        foreign = other.client().session_token(["echo"])["token"]
    finally:
        other.stop()
    assert requests.post(f"{host.url}/models/echo/", json={}, headers=bearer(foreign), timeout=30).status_code == 401


def test_token_requests_are_validated(host):
    for body in ({}, {"scope": []}, {"scope": [""]}, {"scope": ["a"], "ttl": 0}, {"scope": ["a"], "ttl": 10**9}):
        refused = requests.post(f"{host.url}/api/token", json=body, headers=bearer(host.key), timeout=30)
        assert refused.status_code == 400, body
    assert requests.post(f"{host.url}/api/token", json={"scope": ["a"]}, timeout=30).status_code == 401


def test_a_deployment_credential_dies_with_its_deployment(host, tmp_path):
    code = "import os\nasync def predict(payload_dict, **kw):\n    return {'token': os.environ['LLM_NB_DEPLOYMENT_TOKEN']}\n"
    client = host.client()
    client.deploy("leaky", make_deployment(tmp_path / "leaky", code))
    credential = requests.post(f"{host.url}/models/leaky/", json={}, headers=bearer(host.key), timeout=30).json()[
        "token"
    ]
    assert credential != host.key
    assert requests.get(f"{host.url}/v1/models", headers=bearer(credential), timeout=30).ok
    refused = requests.post(f"{host.url}/api/token", json={"scope": ["*"]}, headers=bearer(credential), timeout=30)
    assert refused.status_code == 403
    client.undeploy("leaky")
    assert requests.get(f"{host.url}/v1/models", headers=bearer(credential), timeout=30).status_code == 401


def test_get_session_token_reads_the_connection_file_and_reuses_live_tokens(deployed):
    host = deployed
    url = f"{host.url}/models/echo/"
    token = consume.get_session_token(url)
    assert claims(token)["scope"] == ["echo"]
    assert consume.get_session_token(url, token=token) == token, "a live token is handed back"
    assert consume.get_meta(url, token)["name"] == "echo"
    nearly_gone = host.client().session_token(["echo"], ttl=30)["token"]
    fresh = consume.get_session_token(url, token=nearly_gone)
    assert fresh != nearly_gone and claims(fresh)["exp"] > claims(nearly_gone)["exp"]
    assert claims(consume.get_session_token(f"{host.url}/v1"))["scope"] == ["*"]
    with pytest.raises(AuthenticationError, match="api_key"):
        consume.get_session_token("http://127.0.0.1:9/models/x/")
    by_key = consume.get_session_token(url, api_key=host.key, scope=["echo", "other"])
    assert claims(by_key)["scope"] == ["echo", "other"]
