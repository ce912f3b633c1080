"""Security: loopback only, private files, keys checked in constant time and never logged."""

from __future__ import annotations

import asyncio
import hmac
import os

import psutil
import requests
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llm_nb.host import http as host_http


def test_host_listens_on_loopback_only(host):
    host.client().load("smollm2")
    addresses = {
        conn.laddr.ip
        for proc in [psutil.Process(host.process.pid), *psutil.Process(host.process.pid).children(recursive=True)]
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }
    assert addresses == {"127.0.0.1"}


def test_connection_file_and_folders_are_private(host):
    assert os.stat(host.connection_file).st_mode & 0o777 == 0o600
    assert os.stat(host.runtime_dir).st_mode & 0o777 == 0o700
    host.client().load("smollm2")
    logs = host.runtime_dir / "logs"
    assert os.stat(logs).st_mode & 0o777 == 0o700


def test_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(host_http.hmac, "compare_digest", spy)

    async def run() -> list[int]:
        app = web.Application(middlewares=[host_http.error_middleware, host_http.make_auth_middleware("s3cret-key")])

        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app.router.add_get("/api/status", ok)
        async with TestClient(TestServer(app)) as client:
            statuses = []
            for header in ("Bearer s3cret-key", "Bearer s3cret-kez", "Bearer x", "Basic s3cret-key", ""):
                response = await client.get("/api/status", headers={"Authorization": header} if header else {})
                statuses.append(response.status)
            return statuses

    assert asyncio.run(run()) == [200, 401, 401, 401, 401]
    assert [b for _, b in calls] == [b"s3cret-key"] * 3  # every bearer credential went through compare_digest


def test_nothing_logs_or_echoes_the_key(host):
    key = host.key
    client = host.client()
    client.load("smollm2")
    client.chat("hello", "smollm2", max_tokens=3)
    wrong = key[::-1]
    answer = requests.get(host.url + "/api/status", headers={"Authorization": f"Bearer {wrong}"}, timeout=5)
    assert answer.status_code == 401 and wrong not in answer.text and key not in answer.text
    requests.post(
        host.url + "/v1/chat/completions", data=b"{bad", headers={"Authorization": f"Bearer {key}"}, timeout=5
    )
    client.unload("smollm2", force=True)
    texts = [p.read_text(errors="replace") for p in host.runtime_dir.rglob("*.log")]
    texts.append((host.runtime_dir.parent.parent / "host-stdout.log").read_text(errors="replace"))
    assert texts and all(key not in text and wrong not in text for text in texts)
    status = requests.get(host.url + "/api/status", headers={"Authorization": f"Bearer {key}"}, timeout=5).text
    assert key not in status
