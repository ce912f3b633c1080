"""Remote engines as models: an OpenAI-compatible (or KServe v2) endpoint served elsewhere.

A remote model needs no worker: the host proxies its requests with a pooled
aiohttp session. Streams pass through chunk by chunk without buffering, the
model name is mapped both ways, usage is passed on, and the remote's errors
and time-outs become this host's error JSON. The API key comes from an
environment variable (the host's, or the loading client's, sent once at
load); it is kept in memory only and never shown in status, logs or errors.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import aiohttp
from aiohttp import web

from ..catalog import ModelSpec
from ..errors import InvalidRequest, LlmNbError, ModelFailed, ModelNotFound, QueueFull, RemoteError, Timeout

log = logging.getLogger("llm_nb.backends.remote")
HEALTH_INTERVAL_S = 15.0
DEFAULT_CONCURRENCY = 4


def openai_base(url: str) -> str:
    """``http://h:8000`` -> ``http://h:8000/v1``; a URL already ending in ``/v1`` stays."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteEngine:
    """The host's handle on one remote model."""

    def __init__(self, spec: ModelSpec, api_key: str | None):
        parsed = urlparse(spec.url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidRequest(f"remote url {spec.url!r} must be http(s)://host[:port][/path]")
        self.spec = spec
        self.protocol = str(spec.options.get("protocol", "openai"))
        if self.protocol not in ("openai", "kserve-v2"):
            raise InvalidRequest("remote option protocol must be 'openai' or 'kserve-v2'")
        self.base = openai_base(spec.url) if self.protocol == "openai" else spec.url.rstrip("/")
        self.remote_model = spec.remote_model
        self._api_key = api_key
        self.concurrency = int(spec.options.get("max_concurrency", DEFAULT_CONCURRENCY))
        self.timeout = float(spec.options.get("timeout", 300))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=self.concurrency * 2, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.timeout),
        )
        self.healthy: bool | None = None
        self.health_error: str | None = None
        self.latency_ms: float | None = None
        self._checked = 0.0

    @classmethod
    async def create(cls, spec: ModelSpec, api_key: str | None = None) -> RemoteEngine:
        if spec.api_key_env and os.environ.get(spec.api_key_env):
            api_key = os.environ[spec.api_key_env]  # the host's own environment wins
        elif spec.api_key_env and not api_key:
            raise InvalidRequest(
                f"the environment variable {spec.api_key_env} is not set for the host or the loading client; set it to the remote's API key"
            )
        engine = cls(spec, api_key)
        try:
            await engine.check()
        except BaseException:
            await engine.close()
            raise
        return engine

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # --- checks --------------------------------------------------------------
    async def check(self) -> None:
        """Refuse the load unless the remote answers and serves the model."""
        started = time.monotonic()
        try:
            if self.protocol == "kserve-v2":
                async with self.session.get(
                    f"{self.base}/v2/health/ready", timeout=aiohttp.ClientTimeout(total=10)
                ) as r:
                    if r.status != 200:
                        raise ModelFailed(f"the KServe endpoint {self.base} is not ready (HTTP {r.status})")
                    ids = []
            else:
                async with self.session.get(f"{self.base}/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    if r.status in (401, 403):
                        raise ModelFailed(
                            f"{self.base} refused our API key (HTTP {r.status}); check --api-key-env "
                            f"{self.spec.api_key_env or '(none given)'}"
                        )
                    if r.status != 200:
                        raise ModelFailed(
                            f"{self.base}/models answered HTTP {r.status}: {self._scrub((await r.text())[:200])}"
                        )
                    ids = [m.get("id") for m in (await r.json(content_type=None)).get("data", [])]
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ModelFailed(
                f"the remote engine at {self.base} does not answer: {self._scrub(str(exc)) or type(exc).__name__}"
            ) from exc
        self.latency_ms = (time.monotonic() - started) * 1000
        self.healthy, self.health_error, self._checked = True, None, time.monotonic()
        if self.protocol == "openai":
            if self.remote_model is None:
                if len(ids) != 1:
                    raise InvalidRequest(
                        f"{self.base} serves {', '.join(map(str, ids)) or 'no models'}; name one with --remote-model"
                    )
                self.remote_model = ids[0]
            elif self.remote_model not in ids:
                raise ModelNotFound(
                    f"{self.base} does not serve {self.remote_model!r}; it serves: {', '.join(map(str, ids)) or 'nothing'}"
                )

    async def refresh_health(self) -> bool:
        """Re-check now and then; returns True when the state changed."""
        if time.monotonic() - self._checked < HEALTH_INTERVAL_S:
            return False
        before = self.healthy
        try:
            await self.check()
        except LlmNbError as exc:
            self.healthy, self.health_error = False, str(exc)
            self._checked = time.monotonic()
        return before != self.healthy

    async def info(self) -> dict[str, Any]:
        return {
            "backend": "remote",
            "device": "remote",
            "parallel": self.concurrency,
            "url": self.spec.url,
            "remote_model": self.remote_model,
            "protocol": self.protocol,
            "healthy": self.healthy,
            "health_error": self.health_error,
            "latency_ms": self.latency_ms,
        }

    # --- proxying ------------------------------------------------------------
    async def _remote_error(self, response: aiohttp.ClientResponse) -> LlmNbError:
        text = self._scrub((await response.text())[:1000])
        try:
            detail = json.loads(text)
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            message = detail.get("message") if isinstance(detail, dict) else None
            message = message or (detail.get("detail") if isinstance(detail, dict) else None) or text
        except ValueError:
            message = text
        where = f"the remote engine at {self.base}"
        if response.status == 429:
            return QueueFull(
                f"{where} is busy (429): {message}", retry_after=int(response.headers.get("Retry-After", "1") or 1)
            )
        if response.status in (401, 403):
            return RemoteError(
                f"{where} refused our API key ({response.status}); check {self.spec.api_key_env or 'the key'}"
            )
        if 400 <= response.status < 500 and response.status != 404:
            return LlmNbError(
                f"{where} refused the request ({response.status}): {message}",
                code="invalid_request",
                status=response.status,
            )
        return RemoteError(f"{where} failed ({response.status}): {message}")

    def _rename(self, data: dict) -> dict:
        if isinstance(data, dict) and "model" in data:
            data["model"] = self.spec.name
        return data

    async def proxy(
        self, request: web.Request, path: str, body: dict, on_served: Callable[[], None] = lambda: None
    ) -> web.StreamResponse:
        """Send an OpenAI request on; stream or return the answer with our model name.

        ``on_served`` runs once the whole answer came, before its last bytes go out, so a client
        that reads the end of the answer finds it counted.
        """
        if self.protocol != "openai":
            raise InvalidRequest(f"{self.spec.name!r} is a KServe v2 model; use /v2/models/{self.spec.name}/infer")
        payload = dict(body, model=self.remote_model)
        stream = bool(payload.get("stream"))
        response: web.StreamResponse | None = None
        try:
            async with self.session.post(f"{self.base}/{path}", json=payload) as remote:
                if remote.status >= 400:
                    raise await self._remote_error(remote)
                if not stream:
                    answer = self._rename(await remote.json(content_type=None))
                    on_served()
                    return web.json_response(answer)
                response = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        "X-Accel-Buffering": "no",
                    }
                )
                await response.prepare(request)
                saw_done = False
                async for line in remote.content:  # line by line: no buffering beyond one event
                    if line.startswith(b"data:"):
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            saw_done = True
                            on_served()
                        elif data.startswith(b"{"):
                            line = b"data: " + json.dumps(self._rename(json.loads(data))).encode() + b"\n"
                    await response.write(line)
                if not saw_done:
                    raise RemoteError(f"the remote engine at {self.base} ended the stream early")
                await response.write_eof()
                return response
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            error = RemoteError(
                f"lost the remote engine at {self.base} mid-request: {self._scrub(str(exc)) or type(exc).__name__}"
            )
        except TimeoutError:
            error = Timeout(f"the remote engine at {self.base} did not answer within {self.timeout:.0f} s")
        except RemoteError as exc:
            error = exc
        if response is None:
            raise error
        await response.write(f"data: {json.dumps(error.to_json())}\n\n".encode())  # in-band, like the local models
        return response

    async def close(self) -> None:
        await self.session.close()
