"""The shared host: OpenAI compatibility, attach and leases, auth, bad input, lifecycle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from llm_nb.client import Client
from llm_nb.connection import read_connection
from llm_nb.errors import ModelNotFound

from .conftest import start_host, wait_for


def openai_client(host) -> openai.OpenAI:
    return openai.OpenAI(base_url=host.url + "/v1", api_key=host.key, max_retries=0)


def post(host, path: str, body=None, *, key: str | None = "host", data: bytes | None = None, **kwargs):
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {host.key if key == 'host' else key}"
    if data is None and body is not None:
        data = json.dumps(body).encode()
    return requests.post(host.url + path, data=data, headers=headers, timeout=60, **kwargs)


# --- OpenAI compatibility, through the official client ----------------------------------


def test_openai_chat_completion_has_text_usage_and_finish_reason(shared_host):
    reply = openai_client(shared_host).chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12


def test_openai_streaming_equals_non_streaming_and_reports_usage(shared_host):
    client = openai_client(shared_host)
    messages = [{"role": "user", "content": "Count from one to five in words."}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_openai_completions_honour_stop_sequences(shared_host):
    client = openai_client(shared_host)
    free = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    assert " 5" in free.choices[0].text, free.choices[0].text
    stopped = client.completions.create(
        model="smollm2", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 6"]
    )
    text = stopped.choices[0].text
    assert " 6" not in text and text == free.choices[0].text.split(" 6")[0]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="smollm2", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 6"], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_chat_stop_sequence_cuts_reply(shared_host):
    client = openai_client(shared_host)
    messages = [{"role": "user", "content": "List the days of the week, comma separated."}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 6
    stop = text[3:6]
    cut = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"


def test_models_list_shows_loaded_models(shared_host):
    ids = [m.id for m in openai_client(shared_host).models.list().data]
    assert "smollm2" in ids


# --- auth ---------------------------------------------------------------------------


def test_missing_or_wrong_key_is_refused_and_health_is_open(shared_host):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    for key in (None, "wrong-key", shared_host.key[:-1]):
        response = post(shared_host, "/v1/chat/completions", body, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(shared_host.url + "/api/status", timeout=5).status_code == 401
    health = requests.get(shared_host.url + "/health", timeout=5)
    assert health.status_code == 200 and "key" not in health.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=shared_host.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_host_binds_loopback_and_connection_file_is_private(shared_host):
    info = shared_host.info
    assert info["url"].startswith("http://127.0.0.1:")
    assert os.stat(shared_host.connection_file).st_mode & 0o777 == 0o600
    assert os.stat(info["runtime_dir"]).st_mode & 0o777 == 0o700
    for key in ("url", "key", "pid", "version"):
        assert key in info


# --- bad input: each gets its status, and the host serves the next request ------------------


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, "invalid_request"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_request"),
    ("/v1/chat/completions", b"", 400, "invalid_request"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "invalid_request"),
    (
        "/v1/chat/completions",
        {"model": "smollm2", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "invalid_request",
    ),
    (
        "/v1/chat/completions",
        {"model": "smollm2", "messages": [{"role": "user", "content": 5}]},
        400,
        "invalid_request",
    ),
    (
        "/v1/chat/completions",
        {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        400,
        "invalid_request",
    ),
    (
        "/v1/chat/completions",
        {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"},
        400,
        "invalid_request",
    ),
    (
        "/v1/chat/completions",
        {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12},
        400,
        "invalid_request",
    ),
    (
        "/v1/chat/completions",
        {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "n": 9},
        400,
        "invalid_request",
    ),
    (
        "/v1/chat/completions",
        {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model_not_found",
    ),
    ("/v1/completions", {"model": "smollm2", "prompt": ["a", "b"]}, 400, "invalid_request"),
    ("/v1/completions", {"model": "smollm2"}, 400, "invalid_request"),
    ("/v1/embeddings", {"model": "smollm2", "input": "x"}, 400, "invalid_request"),
    ("/api/models/load", {"model": "/no/such/file.gguf"}, 404, "model_not_found"),
    ("/api/models/load", {"model": "smollm2", "backend": "tensorflow"}, 400, "invalid_request"),
    ("/api/models/load", {"model": "smollm2", "name": "other", "options": {"n_gpu_layerz": 1}}, 400, "invalid_request"),
    ("/api/models/load", {"model": "smollm2", "name": "tpu", "options": {"device": "tpu"}}, 400, "invalid_request"),
    ("/api/models/unload", {"model": "never-loaded"}, 404, "model_not_found"),
    ("/no/such/route", {}, 404, "not_found"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_REQUESTS)
def test_bad_input_gets_its_status_and_the_host_keeps_serving(shared_host, path, body, status, code):
    data = body if isinstance(body, bytes) else None
    response = post(shared_host, path, None if data is not None else body, data=data)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    ok = post(
        shared_host,
        "/v1/chat/completions",
        {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert ok.status_code == 200


def test_prompt_longer_than_context_is_422_not_truncated(host):
    client = host.client()
    loaded = client.load("smollm2", name="short-ctx", options={"n_ctx": 256})
    n_ctx = loaded["model"]["info"]["n_ctx"]
    response = post(
        host, "/v1/chat/completions", {"model": "short-ctx", "messages": [{"role": "user", "content": "word " * 400}]}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and f"context of {n_ctx}" in error["message"]
    assert client.chat("hi", "short-ctx", max_tokens=3)


def test_body_over_the_limit_is_413(host_factory):
    host = host_factory(LLM_NB_MAX_BODY="64KiB")
    response = post(
        host, "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "x" * 100_000}]}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert requests.get(host.url + "/health", timeout=5).ok


def test_full_queue_answers_429_with_retry_after(host_factory):
    host = host_factory(LLM_NB_MAX_QUEUE="1")
    host.client().load("smollm2")
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 120,
        "temperature": 0,
    }
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(host, "/v1/chat/completions", body), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and 429 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"


def test_requests_while_loading_get_503_model_loading_when_requests_may_not_load(host_factory):
    host = host_factory(LLM_NB_LOAD_ON_REQUEST="0")
    client = host.client()
    loader = threading.Thread(target=lambda: client.load("smollm2", name="slow-start"))
    loader.start()
    wait_for(lambda: any(m["name"] == "slow-start" for m in client.status()["models"]), 20, 0.02, "the load to begin")
    response = post(
        host, "/v1/chat/completions", {"model": "slow-start", "messages": [{"role": "user", "content": "x"}]}
    )
    loader.join(60)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "model_loading"
    assert "Retry-After" in response.headers


# --- attach, leases, keep-alive ------------------------------------------------------------


def test_attach_returns_the_same_single_copy(host):
    first = host.client().load("smollm2")
    other = Client(host.connection_file, autostart=False)
    other.identity = dict(other.identity, id="second-client", name="second.ipynb")
    second = other.load("smollm2")
    assert first["attached"] is False and second["attached"] is True
    assert second["model"]["worker_pid"] == first["model"]["worker_pid"]
    assert second["seconds"] < 0.5
    assert len(host.worker_pids()) == 1
    status = host.client().status()
    (model,) = status["models"]
    assert sorted(lease["name"] for lease in model["leases"]) == sorted([first["lease"]["name"], "second.ipynb"])
    assert model["memory_bytes"] > 50 * 1024**2  # measured from the worker, not zero


def test_keep_alive_zero_frees_at_once_and_positive_waits(host):
    client = host.client()
    client.load("smollm2", keep_alive=0)
    result = client.unload("smollm2")
    assert result["unloaded"] is True
    assert client.status()["models"] == []
    client.load("smollm2", keep_alive=1.5)
    result = client.unload("smollm2")
    assert result["unloaded"] is False and result["expires_at"]
    assert client.status()["models"][0]["state"] == "idle"
    wait_for(lambda: client.status()["models"] == [], 8, 0.2, "keep-alive expiry")
    assert host.worker_pids() == []


def test_force_unload_frees_whoever_holds(host):
    client = host.client()
    client.load("smollm2")
    other = Client(host.connection_file, autostart=False)
    other.identity = dict(other.identity, id="other")
    other.load("smollm2")
    assert client.unload("smollm2")["unloaded"] is False
    assert client.unload("smollm2", force=True)["unloaded"] is True
    assert client.status()["models"] == []
    with pytest.raises(ModelNotFound):
        client.chat("hi", "smollm2")


def test_lease_of_a_killed_client_goes_within_10_s(host):
    script = "import time, llm_nb.client as c; cl = c.Client(autostart=False); cl.load('smollm2'); print('loaded', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], env=host.env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "loaded"
        client = host.client()
        assert any(lease["client"].startswith(f"pid:{proc.pid}@") for lease in client.status()["models"][0]["leases"])
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        wait_for(lambda: not client.status()["models"][0]["leases"], 10, 0.2, "the dead client's lease to go")
        assert time.monotonic() - killed < 10
    finally:
        proc.kill()


# --- one host, found or started ---------------------------------------------------------


def test_two_clients_autostarting_at_once_get_one_host(tmp_path):
    from .conftest import host_env

    env = host_env(tmp_path)
    script = "import llm_nb.client as c; print(c.Client().host_info()['pid'])"
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    pids = {p.communicate(timeout=90)[0].strip() for p in procs}
    info = read_connection(tmp_path / "rt" / "host.json")
    try:
        assert len(pids) == 1 and pids == {str(info["pid"])}
    finally:
        os.kill(info["pid"], signal.SIGTERM)
        wait_for(lambda: not (tmp_path / "rt" / "host.json").exists(), 15, 0.1, "the host to stop")


def test_stale_connection_file_is_replaced(tmp_path):
    conn = tmp_path / "rt" / "host.json"
    conn.parent.mkdir(parents=True)
    conn.write_text(json.dumps({"url": "http://127.0.0.1:9", "key": "old", "pid": 999_999_9, "version": "0"}))
    host = start_host(tmp_path)
    try:
        assert host.info["pid"] == host.process.pid and host.info["key"] != "old"
    finally:
        host.stop()


def test_second_host_on_the_same_file_refuses_to_start(host):
    result = subprocess.run(
        [sys.executable, "-m", "llm_nb.host", "--connection-file", str(host.connection_file)],
        env=host.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "already runs" in result.stderr
    assert host.info["pid"] == host.process.pid


def test_sigterm_with_a_request_in_flight_finishes_cleanly(host):
    client = host.client()
    client.load("smollm2")
    stream = client.chat("Tell me a long story about a cat.", "smollm2", stream=True, max_tokens=200, temperature=0)
    pieces = iter(stream)
    next(pieces)
    host.process.send_signal(signal.SIGTERM)
    rest = "".join(pieces)  # the reply finishes within the grace period, or ends with a clear error
    assert stream.finish_reason in ("length", "stop") and rest
    assert host.process.wait(30) == 0
    assert not host.connection_file.exists()
    assert host.worker_pids() == []


def test_cli_stop_and_ps(host):
    env = host.env
    ps = subprocess.run([sys.executable, "-m", "llm_nb.cli", "ps"], env=env, capture_output=True, text=True, timeout=60)
    assert ps.returncode == 0 and "budget:" in ps.stdout
    stop = subprocess.run(
        [sys.executable, "-m", "llm_nb.cli", "stop"], env=env, capture_output=True, text=True, timeout=60
    )
    assert stop.returncode == 0 and "stopping" in stop.stdout
    assert host.process.wait(30) == 0
    assert not host.connection_file.exists()


def test_llamacpp_device_option_places_the_model(host):
    client = host.client()
    loaded = client.load("smollm2", name="on-cpu", options={"device": "cpu"})
    assert loaded["model"]["device"] == "cpu"
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        with pytest.raises(Exception) as caught:
            client.load("smollm2", name="on-gpu", options={"device": "cuda"})
        assert "device=cpu" in str(caught.value)


def test_sigterm_with_an_open_event_stream_stops_promptly(host):
    response = requests.get(
        host.url + "/api/events", headers={"Authorization": f"Bearer {host.key}"}, stream=True, timeout=30
    )
    lines = response.iter_lines()
    assert next(line for line in lines if line).startswith(b"event: status")
    started = time.monotonic()
    host.process.send_signal(signal.SIGTERM)
    assert host.process.wait(15) == 0
    assert time.monotonic() - started < 5
