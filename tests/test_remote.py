"""Remote engines as models, against llama-cpp-python's own OpenAI server on loopback (and a scripted one)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests
from aiohttp import web

from llm_nb.catalog import smollm2_path
from llm_nb.errors import LlmNbError, ModelFailed, ModelNotFound, RemoteError

REMOTE_KEY = "remote-secret-7f3a9c"
MESSAGES = [{"role": "user", "content": "Name two rivers in Europe."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    def __init__(self, api_key: str | None = REMOTE_KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        args = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            smollm2_path(),
            "--model_alias",
            "smollm2-remote",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",
        ]
        if api_key:
            args += ["--api_key", api_key]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or "none", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.models.list()
                return
            except openai.APIConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("llama_cpp.server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture(scope="module")
def remote():
    server = LlamaServer()
    yield server
    server.stop()


@pytest.fixture
def remote_host(host_factory):
    return host_factory(REMOTE_API_KEY=REMOTE_KEY)


def test_chat_through_the_host_streams_the_same_greedy_text_as_a_direct_call(remote, remote_host):
    client = remote_host.client()
    loaded = client.load(
        "cluster", backend="remote", url=remote.url, remote_model="smollm2-remote", api_key_env="REMOTE_API_KEY"
    )
    assert loaded["model"]["state"] == "ready" and loaded["model"]["backend"] == "remote"
    # The first call evaluates the whole prompt, later ones reuse llama.cpp's cached prompt and re-evaluate
    # its last token: numerics differ a little, and a near tie can go the other way. Compare like with like.
    remote.client.chat.completions.create(model="smollm2-remote", messages=MESSAGES, max_tokens=1, temperature=0)
    direct = remote.client.chat.completions.create(
        model="smollm2-remote", messages=MESSAGES, max_tokens=24, temperature=0
    )

    via = openai.OpenAI(base_url=remote_host.url + "/v1", api_key=remote_host.key, max_retries=0)
    chunks = list(
        via.chat.completions.create(model="cluster", messages=MESSAGES, max_tokens=24, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == direct.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3, "passed through token by token"
    assert {c.model for c in chunks} == {"cluster"}

    whole = via.chat.completions.create(model="cluster", messages=MESSAGES, max_tokens=24, temperature=0)
    assert whole.model == "cluster" and whole.usage.completion_tokens == direct.usage.completion_tokens
    assert whole.choices[0].message.content == direct.choices[0].message.content


def test_status_shows_url_never_the_key(remote, remote_host):
    client = remote_host.client()
    client.load("cluster", backend="remote", url=remote.url, api_key_env="REMOTE_API_KEY")
    status = client.status()
    (model,) = status["models"]
    assert model["url"] == remote.url and model["memory_bytes"] == 0
    assert model["info"]["latency_ms"] is not None and model["info"]["remote_model"] == "smollm2-remote"
    assert status["used_bytes"] == 0
    client.chat("hi", "cluster", max_tokens=3)
    assert client.status()["models"][0]["requests_served"] == 1
    assert (
        REMOTE_KEY
        not in requests.get(
            remote_host.url + "/api/status", headers={"Authorization": f"Bearer {remote_host.key}"}
        ).text
    )
    logs = "".join(p.read_text(errors="replace") for p in remote_host.runtime_dir.rglob("*.log"))
    logs += (remote_host.runtime_dir.parent.parent / "host-stdout.log").read_text(errors="replace")
    assert REMOTE_KEY not in logs


def test_key_from_the_loading_client_reaches_the_remote(remote, host, monkeypatch):
    monkeypatch.setenv("MY_CLUSTER_KEY", REMOTE_KEY)  # in the client's environment only, not the host's
    client = host.client()
    client.load("cluster", backend="remote", url=remote.url, api_key_env="MY_CLUSTER_KEY")
    assert client.chat("hi", "cluster", max_tokens=3)
    assert REMOTE_KEY not in str(client.status())


def test_wrong_key_unknown_model_and_dead_remote_refuse_the_load(remote, host, monkeypatch):
    client = host.client()
    monkeypatch.setenv("BAD_KEY", "not-the-key")
    with pytest.raises(ModelFailed) as caught:
        client.load("cluster", backend="remote", url=remote.url, api_key_env="BAD_KEY")
    assert "API key" in str(caught.value) and "not-the-key" not in str(caught.value)
    monkeypatch.setenv("GOOD_KEY", REMOTE_KEY)
    with pytest.raises(ModelNotFound) as caught:
        client.load("cluster", backend="remote", url=remote.url, remote_model="gpt-9", api_key_env="GOOD_KEY")
    assert "smollm2-remote" in str(caught.value)
    with pytest.raises(ModelFailed) as caught:
        client.load("gone", backend="remote", url=f"http://127.0.0.1:{free_port()}/v1")
    assert "does not answer" in str(caught.value)
    assert client.status()["models"] == []


def test_a_remote_that_dies_mid_stream_gives_a_clear_error(host):
    server = LlamaServer(api_key=None)
    try:
        client = host.client()
        client.load("doomed", backend="remote", url=server.url)
        stream = client.chat(
            "Write a long story about mountains.", "doomed", stream=True, max_tokens=400, temperature=0
        )
        pieces = iter(stream)
        next(pieces)
        server.stop()
        started = time.monotonic()
        with pytest.raises(LlmNbError) as caught:
            for _ in pieces:
                pass
        assert time.monotonic() - started < 5
        assert isinstance(caught.value, RemoteError) or caught.value.code == "remote_error"
        assert server.url.removesuffix("/v1") in str(caught.value)
        with pytest.raises(RemoteError):
            client.chat("still there?", "doomed", max_tokens=3)
        assert requests.get(host.url + "/health", timeout=5).ok
    finally:
        server.stop()


def test_user_catalog_can_name_remote_models(remote, host_factory, tmp_path):

    host = host_factory(REMOTE_API_KEY=REMOTE_KEY)
    (tmp_path / "catalog.json").write_text(
        json.dumps(
            {
                "models": {
                    "team-llm": {
                        "backend": "remote",
                        "url": remote.url,
                        "remote_model": "smollm2-remote",
                        "api_key_env": "REMOTE_API_KEY",
                    }
                }
            }
        )
    )
    client = host.client()
    loaded = client.load("team-llm")
    assert loaded["model"]["backend"] == "remote" and loaded["model"]["url"] == remote.url
    assert client.chat("hi", "team-llm", max_tokens=3)


class FakeRemote:
    """A scripted OpenAI-compatible server on loopback, for answers llama_cpp.server never gives."""

    def __init__(self):
        self.bodies: list[dict] = []
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.port = free_port()
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def models(self, request):
        return web.json_response({"data": [{"id": "fake-7b"}]})

    async def chat(self, request):
        body = await request.json()
        self.bodies.append(body)
        if body["messages"][-1]["content"] == "busy":
            return web.json_response(
                {"error": {"message": "too many requests"}}, status=429, headers={"Retry-After": "7"}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece, finish in (("Hel", None), ("lo", None), ("", "stop")):
            choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
            await response.write(f"data: {json.dumps({'model': 'fake-7b', 'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        await response.write(f"data: {json.dumps({'model': 'fake-7b', 'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def embeddings(self, request):
        body = await request.json()
        self.bodies.append(body)
        rows = [{"index": i, "embedding": [float(i), 1.0, 2.0]} for i in range(len(body["input"]))]
        return web.json_response({"data": rows[::-1], "usage": {"prompt_tokens": 4, "total_tokens": 4}})

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_remote_is_shaped_like_a_local_model_usage_busy_answers_and_embeddings_included(host):
    fake = FakeRemote()
    try:
        client = host.client()
        client.load("fake", backend="remote", url=fake.url)
        headers = {"Authorization": f"Bearer {host.key}"}
        busy = requests.post(
            host.url + "/v1/chat/completions",
            json={"model": "fake", "messages": [{"role": "user", "content": "busy"}]},
            headers=headers,
            timeout=10,
        )
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "7"
        assert busy.json()["error"]["code"] == "queue_full"

        via = openai.OpenAI(base_url=host.url + "/v1", api_key=host.key, max_retries=0)
        chunks = list(
            via.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"top_k": 3},  # a sampling option beyond OpenAI's reaches the remote
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
        assert [c.usage.completion_tokens for c in chunks if c.usage] == [2]
        assert {c.model for c in chunks} == {"fake"}
        sent = fake.bodies[-1]
        assert sent["model"] == "fake-7b" and sent["stream"] and sent["stream_options"] == {"include_usage": True}
        assert sent["top_k"] == 3

        embedded = via.embeddings.create(model="fake", input=["a", "b", "c"])
        assert [e.embedding[0] for e in embedded.data] == [0.0, 1.0, 2.0] and embedded.usage.prompt_tokens == 4
        assert client.status()["models"][0]["requests_served"] == 2, "the refused request is not counted"
    finally:
        fake.stop()


def test_structured_requests_reach_the_remote_unchanged_and_come_back_renamed(remote, remote_host):
    """response_format (and tools, logprobs, n) are the remote's to serve: relayed as sent, whole and streamed."""
    client = remote_host.client()
    client.load(
        "cluster", backend="remote", url=remote.url, remote_model="smollm2-remote", api_key_env="REMOTE_API_KEY"
    )
    schema = {
        "type": "object",
        "properties": {"river": {"type": "string", "maxLength": 30}, "km": {"type": "integer", "maximum": 9999}},
        "required": ["river", "km"],
    }
    ask = {
        "model": "cluster",
        "messages": MESSAGES,
        "max_tokens": 60,
        "temperature": 0,
        # llama-cpp-python's own dialect: the schema beside json_object. It arrives only if relayed as sent.
        "extra_body": {"response_format": {"type": "json_object", "schema": schema}},
    }
    via = openai.OpenAI(base_url=remote_host.url + "/v1", api_key=remote_host.key, max_retries=0)
    whole = via.chat.completions.create(**ask)
    assert whole.model == "cluster"
    assert set(json.loads(whole.choices[0].message.content)) == {"river", "km"}
    chunks = list(via.chat.completions.create(**ask, stream=True))
    assert {c.model for c in chunks} == {"cluster"}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert set(json.loads(streamed)) == {"river", "km"}
    assert client.status()["models"][0]["requests_served"] == 2
