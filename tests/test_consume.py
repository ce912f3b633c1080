"""llm_nb.consume against this host (deployments, /v1, /v2) and llama-cpp-python's OpenAI server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import subprocess
import sys
import time

import pytest
import requests

from llm_nb import consume
from llm_nb.catalog import smollm2_path
from llm_nb.errors import InvalidRequest

from .conftest import start_host
from .test_deployments import ECHO, make_deployment

API_KEY = "third-party-secret"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A host with SmolLM2 loaded and an echo deployment whose predict sleeps as asked."""
    tmp = tmp_path_factory.mktemp("consume")
    host = start_host(tmp)
    client = host.client()
    client.load("smollm2", keep_alive=-1)
    client.deploy("echo", make_deployment(tmp / "echo", ECHO))
    yield host
    host.stop()


@pytest.fixture(autouse=True)
def _connection(served, monkeypatch):
    # get_session_token finds this host through the connection file, as a kernel would.
    monkeypatch.setenv("LLM_NB_CONNECTION", str(served.connection_file))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama-cpp-python's own OpenAI-compatible server on SmolLM2: a real third-party endpoint."""
    pytest.importorskip("llama_cpp.server")
    port = free_port()
    log = open(tmp_path_factory.mktemp("llama-server") / "server.log", "w+b")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path(), "--host", "127.0.0.1"]
        + ["--port", str(port), "--n_ctx", "1024", "--api_key", API_KEY]
        # By default it cuts off a running stream when a new request arrives (llama-cpp-python#867).
        + ["--interrupt_requests", "False"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                if requests.get(url + "/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"llama_cpp.server did not start:\n{log.read().decode()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def test_fire_sends_prompts_to_a_deployment_in_parallel(served):
    url = f"{served.url}/models/echo/"
    report = consume.fire(url, [f"prompt {i}" for i in range(8)], concurrency=8, params={"sleep": 0.4}, progress=False)
    assert report.protocol == "practicus"
    assert [r.ok for r in report.results] == [True] * 8
    assert all(json.loads(r.text)["echo"]["user_prompt"] == f"prompt {r.index}" for r in report.results)
    assert all(r.latency_s >= 0.4 for r in report.results)
    summary = report.summary
    assert summary["errors"] == 0 and summary["p50_s"] >= 0.4 and summary["p99_s"] >= summary["p50_s"]
    assert report.sequential_wall_s >= 8 * 0.4
    assert summary["speedup"] > 3, f"8 sleeping predictions at once should overlap: {summary}"
    assert "speed-up" in str(report)


def test_fire_against_this_hosts_v1_streams_and_counts_tokens(served):
    prompts = ["Name a colour.", "Name a fruit.", "Name a city.", "Name an animal."]
    report = consume.fire(f"{served.url}/v1", prompts, concurrency=4, max_tokens=8, temperature=0, progress=False)
    assert report.protocol == "openai" and report.model == "smollm2" and report.stream
    for r in report.results:
        assert r.ok and r.status == 200, r.error
        assert r.text and 0 < r.ttft_s <= r.latency_s
        assert r.tokens_counted == "usage" and 0 < r.completion_tokens <= 8
    summary = report.summary
    assert summary["tokens_per_s"] > 0 and summary["ttft_p50_s"] > 0 and summary["requests_per_s"] > 0
    frame = report.to_pandas()
    assert list(frame.index) == [0, 1, 2, 3] and {"latency_s", "ttft_s", "completion_tokens"} <= set(frame.columns)
    assert len(report.to_pandas(sequential=True)) == 4
    html = report._repr_html_()
    assert "<table" in html and "data:image/png;base64," in html
    assert len(report.plot().axes) == 2

    whole = consume.fire(
        f"{served.url}/v1/chat/completions",
        prompts[:2],
        stream=False,
        max_tokens=4,
        compare_sequential=False,
        progress=False,
    )
    assert all(r.ok and r.ttft_s is None and r.completion_tokens for r in whole.results)
    assert whole.sequential is None and "speedup" not in whole.summary


def test_fire_against_llama_cpp_server_a_third_party_endpoint(llama_server):
    prompts = ["Say hello.", "Say goodbye.", "Count to three."]
    report = consume.fire(llama_server, prompts, concurrency=3, api_key=API_KEY, max_tokens=8, progress=False)
    assert report.model  # picked from its /v1/models
    for r in report.results:
        assert r.ok, r.error
        assert r.text and r.ttft_s is not None and r.ttft_s <= r.latency_s
        assert r.completion_tokens and r.completion_tokens <= 8
    assert report.summary["speedup"] is not None

    whole = consume.fire(
        llama_server, prompts[:1], stream=False, api_key=API_KEY, max_tokens=4, compare_sequential=False, progress=False
    )
    assert whole.results[0].ok and whole.results[0].tokens_counted == "usage"

    # No key: 401, reported per request and not retried.
    refused = consume.fire(llama_server, prompts[:2], model=report.model, compare_sequential=False, progress=False)
    assert [(r.ok, r.status, r.attempts) for r in refused.results] == [(False, 401, 1)] * 2
    assert refused.summary["errors"] == 2

    assert consume.get_session_token(llama_server, API_KEY) == API_KEY  # it mints no tokens: its key is the credential
    assert report.model in [m["id"] for m in consume.get_meta(llama_server, API_KEY)["data"]]


def test_429_from_a_full_queue_is_retried_with_backoff(tmp_path):
    host = start_host(tmp_path, LLM_NB_MAX_QUEUE="1")
    try:
        slow = make_deployment(tmp_path / "slow", ECHO, {"max_concurrency": 1})
        host.client().deploy("slow", slow)
        url = f"{host.url}/models/slow/"
        token = consume.get_session_token(url, host.key)
        no_retry = consume.fire(
            url, ["a"] * 5, token=token, params={"sleep": 0.3}, retries=0, compare_sequential=False, progress=False
        )
        refused = [r for r in no_retry.results if not r.ok]
        assert refused and all(r.status == 429 and r.attempts == 1 for r in refused)

        patient = consume.fire(
            url,
            ["a"] * 5,
            token=token,
            params={"sleep": 0.3},
            retries=8,
            backoff=0.2,
            compare_sequential=False,
            progress=False,
        )
        assert all(r.ok for r in patient.results), [r.error for r in patient.results]
        assert patient.summary["retries"] > 0 and max(r.attempts for r in patient.results) > 1
    finally:
        host.stop()


def test_other_errors_are_not_retried(served):
    url = f"{served.url}/models/echo/"
    report = consume.fire(
        url,
        ["x", "y"],
        payload_builder=lambda p: {"fail": True, "p": p},
        retries=5,
        compare_sequential=False,
        progress=False,
    )
    assert [(r.ok, r.status, r.attempts) for r in report.results] == [(False, 500, 1)] * 2
    assert "asked to fail" in report.results[0].error


def test_predict_and_get_meta(served):
    url = f"{served.url}/models/echo/"
    token = consume.get_session_token(url)
    assert consume.predict(url, {"user_prompt": "hi"}, token)["echo"] == {"user_prompt": "hi"}
    meta = consume.get_meta(url, token)
    assert meta["name"] == "echo" and meta["state"] == "ready"
    with pytest.raises(Exception, match="not valid for"):
        consume.predict(f"{served.url}/models/other/", {}, token)
    assert [
        m["id"] for m in consume.get_meta(f"{served.url}/v1", consume.get_session_token(f"{served.url}/v1"))["data"]
    ] == ["smollm2"]


def test_fire_works_where_an_event_loop_already_runs(served):
    """In Jupyter the kernel's loop is running: fire() still works, and afire() can be awaited."""
    url = f"{served.url}/models/echo/"

    async def notebook_cell():
        sync_report = consume.fire(url, ["a", "b"], compare_sequential=False, progress=False)
        async_report = await consume.afire(url, ["c"], compare_sequential=False, progress=False)
        return sync_report, async_report

    sync_report, async_report = asyncio.run(notebook_cell())
    assert all(r.ok for r in sync_report.results + async_report.results)


def test_protocols_are_detected_from_the_url():
    assert consume.detect_protocol("http://h/models/echo/") == "practicus"
    assert consume.detect_protocol("http://h/v1") == "openai"
    assert consume.detect_protocol("http://h/openai/v1/chat/completions") == "openai"
    assert consume.detect_protocol("http://h/v1/models/smollm2") == "openai"
    assert consume.detect_protocol("http://h/v2/models/bert/infer") == "kserve-v2"
    assert consume.detect_protocol("http://h/v2/models/bert/versions/1") == "kserve-v2"


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="this host's /v2 serves transformers task models (pip install llm-nb[transformers])",
)
def test_fire_kserve_v2_against_this_hosts_open_inference_protocol(served, tmp_path):
    from .tiny_tasks import build_task_model

    folder = build_task_model(tmp_path / "text", "text-classification")
    served.client().load(str(folder), backend="transformers", task="text-classification", name="sentiment")
    report = consume.fire(
        f"{served.url}/v2/models/sentiment/infer",
        ["i love this movie", "i hate this movie"],
        protocol="auto",
        input_name="input-0",
        compare_sequential=False,
        progress=False,
    )
    assert report.protocol == "kserve-v2" and report.model == "sentiment"
    assert all(r.ok and r.text in ("0", "1") for r in report.results), [r.error for r in report.results]
    assert (
        consume.get_meta(
            f"{served.url}/v2/models/sentiment", consume.get_session_token(f"{served.url}/v2/models/sentiment")
        )["name"]
        == "sentiment"
    )


def test_the_kernel_side_modules_import_no_host_and_no_model_library():
    code = (
        "import sys, llm_nb.consume, llm_nb.deployment\n"
        "print(sorted({'torch', 'transformers', 'llama_cpp', 'llm_nb.host', 'llm_nb.backends'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_fire_compares_with_one_at_a_time_on_the_first_8_prompts_by_default(served):
    url = f"{served.url}/models/echo/"
    token = consume.get_session_token(url)
    served_before = consume.get_meta(url, token)["requests_served"]
    prompts = [f"prompt {i}" for i in range(100)]
    report = consume.fire(url, prompts, concurrency=16, token=token, params={"sleep": 0.05}, progress=False)
    sent = consume.get_meta(url, token)["requests_served"] - served_before
    summary = report.summary
    assert summary["errors"] == 0 and summary["retries"] == 0
    assert sent == 108, "100 in parallel, then the first 8 again one at a time; not all 100 twice"
    assert [r.prompt for r in report.sequential] == prompts[:8] and summary["sequential_prompts"] == 8
    assert "one at a time (first 8 of 100 prompts)" in str(report)
    # Time per request, 16 at once against one at a time: the sleeps overlap.
    assert summary["speedup"] > 3, summary

    whole = consume.fire(url, prompts[:6], concurrency=3, token=token, compare_sequential=True, progress=False)
    assert len(whole.sequential) == 6 and "one at a time " in str(whole) and "(first" not in str(whole)
    with pytest.raises(InvalidRequest, match="compare_sequential"):
        consume.fire(url, prompts[:2], concurrency=2, token=token, compare_sequential=-1, progress=False)
