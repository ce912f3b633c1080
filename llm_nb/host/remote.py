"""Remote engines as models: an OpenAI-compatible (or KServe v2) endpoint served elsewhere.

A remote model needs no worker: the host calls the remote itself, through a
pooled aiohttp session, behind the same interface as a worker
(``WorkerProcess``): ``generate`` yields ``{"text"}`` events and then
``{"finish_reason", "prompt_tokens", "completion_tokens"}``, ``embed`` answers
``{"data", "prompt_tokens"}``. So the routes shape, queue and count a remote's
answers exactly as a local model's, and the remote's name for the model never
reaches a client. The remote's errors and time-outs become this host's errors,
raised from the generator (a stream already under way carries them in-band).

The API key comes from an environment variable (the host's, or the loading
client's, sent once at load); it is kept in memory only and never shown in
status, logs or errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp

from ..catalog import ModelSpec
from ..errors import InvalidRequest, LlmNbError, ModelFailed, ModelNotFound, QueueFull, RemoteError, Timeout

log = logging.getLogger("llm_nb.host.remote")
HEALTH_INTERVAL_S = 15.0
DEFAULT_CONCURRENCY = 4
#: Fields that make a request go to a remote engine unchanged: it serves them itself.
RELAYED_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs", "n")
#: Keys of a worker request that are not sampling parameters of the OpenAI request.
_NOT_SAMPLING = ("kind", "messages", "prompt", "stop", "stream", "grammar", "tools", "logprobs")


def openai_base(url: str) -> str:
    """``http://h:8000`` -> ``http://h:8000/v1``; a URL already ending in ``/v1`` stays."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def openai_request(request: dict, remote_model: str) -> tuple[str, dict]:
    """A worker request (``schemas.*Request.worker_request()``) as the OpenAI call it came from: (path, body)."""
    body = {k: v for k, v in request.items() if k not in _NOT_SAMPLING}
    body["model"] = remote_model
    if request.get("stop"):
        body["stop"] = request["stop"]
    if request["kind"] == "chat":
        return "chat/completions", dict(body, messages=request["messages"])
    return "completions", dict(body, prompt=request.get("prompt") or "")


def final_event(finish_reason: str | None, usage: dict | None) -> dict:
    """The last event of a generation; a remote that reports no usage leaves the token counts out."""
    final: dict[str, Any] = {"finish_reason": finish_reason}
    if usage:
        final.update(prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0))
    return final


class RemoteEngine:
    """The host's handle on one remote model: a runner, like a worker process."""

    pid: int | None = None  # nothing runs here: no process to measure or log
    log_path: Path | None = None

    def __init__(self, spec: ModelSpec, api_key: str | None = None):
        parsed = urlparse(spec.url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidRequest(f"remote url {spec.url!r} must be http(s)://host[:port][/path]")
        if spec.api_key_env and os.environ.get(spec.api_key_env):
            api_key = os.environ[spec.api_key_env]  # the host's own environment wins
        elif spec.api_key_env and not api_key:
            raise InvalidRequest(
                f"the environment variable {spec.api_key_env} is not set for the host or the loading client; set it to the remote's API key"
            )
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
        self._in_flight = 0  # requests being answered: no health checks meanwhile (refresh_health)

    @property
    def where(self) -> str:
        """The engine, as errors name it."""
        return f"the remote engine at {self.base}"

    def relays(self, parsed, passthrough: bool = True) -> bool:
        """Whether this request goes to the engine as the client wrote it (``host.relay``): fields the
        engine serves itself (tools, formats, logprobs, n); plain requests take the shared path.

        ``passthrough``: the caller passes the engine's answer on as it comes (the /v1 chat and
        completion routes); False where it needs the answer whole (``/v1/responses``), which a
        plain request should not wait for."""
        return any(name in parsed.model_fields_set for name in RELAYED_FIELDS)

    def relay_body(self, body: dict) -> dict:
        """The client's request as the engine gets it."""
        return dict(body, model=self.remote_model)

    def request_extras(self, request: dict) -> dict:
        """Fields of the engine's own that carry what the OpenAI request cannot (none for a plain remote)."""
        return {}

    async def lost(self, exc: BaseException) -> LlmNbError:
        """What to say when the connection to the engine broke mid-request."""
        if isinstance(exc, LlmNbError):
            return exc
        if isinstance(exc, TimeoutError):
            return Timeout(f"{self.where} did not answer within {self.timeout:.0f} s")
        return RemoteError(f"lost {self.where} mid-request: {self._scrub(str(exc)) or type(exc).__name__}")

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    async def open(self, on_progress: Callable[[dict], None]) -> dict:
        """Refuse the load unless the remote answers and serves the model; then its info."""
        await self.check()
        return await self.info()

    # --- checks --------------------------------------------------------------
    async def check(self) -> None:
        """Raise unless the remote answers and serves the model."""
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
        """Re-check now and then; returns True when the state changed (and so ``info()``)."""
        # A remote answering us is alive; and llama-cpp-python's server ends a running stream early
        # ("interrupt_requests") when any other request, even GET /models, comes in.
        if self._in_flight or time.monotonic() - self._checked < HEALTH_INTERVAL_S:
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

    # --- requests --------------------------------------------------------------
    def _openai_only(self) -> InvalidRequest | None:
        if self.protocol == "openai":
            return None
        return InvalidRequest(
            f"{self.spec.name!r} is a KServe v2 endpoint ({self.base}); this host passes only OpenAI requests on "
            f"to a remote engine, so send requests for it to {self.base}/v2/models/<model>/infer directly"
        )

    async def _remote_error(self, response: aiohttp.ClientResponse) -> LlmNbError:
        text = self._scrub((await response.text())[:1000])
        try:
            detail = json.loads(text)
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            message = detail.get("message") if isinstance(detail, dict) else None
            message = message or (detail.get("detail") if isinstance(detail, dict) else None) or text
        except ValueError:
            message = text
        where = self.where
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

    @contextlib.asynccontextmanager
    async def _post(self, path: str, body: dict) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST to the remote; its error answers, a lost connection and a time-out become our errors.

        The caller reads the answer inside the block, so a remote that dies mid-stream is caught too.
        """
        self._in_flight += 1
        try:
            async with self.session.post(f"{self.base}/{path}", json=body) as remote:
                if remote.status >= 400:
                    raise await self._remote_error(remote)
                yield remote
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise await self.lost(exc) from exc
        finally:
            self._in_flight -= 1

    @contextlib.asynccontextmanager
    async def relay(self, path: str, body: dict) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST an OpenAI request as a client wrote it (``host.relay``); the answer is read inside the block."""
        if refused := self._openai_only():
            raise refused
        async with self._post(path, self.relay_body(body)) as remote:
            yield remote

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """The worker's events for a worker request, from the remote's OpenAI answer.

        A streamed request streams from the remote too (``include_usage`` asks for the token
        counts); a whole one asks for a whole answer, which carries exact usage from every
        OpenAI-compatible server (llama-cpp-python's, for one, streams none).
        """
        if refused := self._openai_only():
            raise refused
        path, body = openai_request(request, self.remote_model)
        body.update(self.request_extras(request))
        stream = request.get("stream", True)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        async with self._post(path, body) as remote:
            if stream:
                async for event in self._stream_events(remote):
                    yield event
                return
            answer = await remote.json(content_type=None)
        choice = (answer.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
        if text:
            yield {"text": text}
        yield final_event(choice.get("finish_reason"), answer.get("usage"))

    async def _stream_events(self, remote: aiohttp.ClientResponse) -> AsyncIterator[dict]:
        finish_reason, usage = None, None
        async for line in remote.content:  # line by line: nothing held back beyond one event
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                yield final_event(finish_reason, usage)
                return
            if not data.startswith(b"{"):
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                raise RemoteError(f"{self.where} failed: {self._scrub(str(error.get('message')))}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                if text:
                    yield {"text": text}
                finish_reason = choice.get("finish_reason") or finish_reason
        raise await self.lost(RemoteError(f"{self.where} ended the stream early"))

    async def embed(self, inputs: list[str | list[int]]) -> dict:
        if refused := self._openai_only():
            raise refused
        body = {"model": self.remote_model, "input": inputs, "encoding_format": "float"}
        async with self._post("embeddings", body) as remote:
            answer = await remote.json(content_type=None)
        rows = sorted(answer.get("data") or [], key=lambda row: row.get("index", 0))
        return {
            "data": [row["embedding"] for row in rows],
            "prompt_tokens": (answer.get("usage") or {}).get("prompt_tokens", 0),
        }

    async def classify(self, inputs: list, parameters: dict) -> dict:
        raise self._openai_only() or InvalidRequest(
            f"{self.spec.name!r} is a remote model behind {self.base}; this host passes only OpenAI requests on "
            "to a remote engine, not /v2 infer"
        )

    # --- ending --------------------------------------------------------------
    async def stop(self, grace: float = 5.0) -> None:
        await self.close()

    async def kill(self) -> None:
        await self.close()

    async def close(self) -> None:
        await self.session.close()
