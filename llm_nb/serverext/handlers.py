"""REST routes under ``/llm-nb/api/`` that the side panel calls, and ``/llm-nb/models/<name>/``:
a deployment's API, served by the host, reached through this server.

Every handler is an ``APIHandler`` and every verb is ``@web.authenticated``:
Jupyter's own auth (token or login cookie, plus XSRF on POST) guards them.
The handlers talk to the host with its key, which never reaches the browser.
Errors are the host's OpenAI-shaped JSON, passed through with its status.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from tornado.iostream import StreamClosedError

from ..config import stream_read_timeout
from ..errors import HostUnavailable, InvalidRequest, LlmNbError
from ..processes import tail
from ..transport import error_answer

if TYPE_CHECKING:
    from .app import LlmNbExtension

KEEPALIVE_S = 15.0
#: Jupyter's own credentials in a query string: for this server, never a deployment's payload.
JUPYTER_QUERY_KEYS = ("token", "_xsrf")
#: Load fields the panel may set; the client identity is the server's, not the browser's.
LOAD_FIELDS = ("model", "name", "backend", "options", "keep_alive", "chat_format", "task")


class LlmNbHandler(ExtensionHandlerMixin, APIHandler):
    """Shared plumbing: JSON bodies, errors as OpenAI-shaped JSON, calls to the host."""

    @property
    def ext(self) -> LlmNbExtension:
        return self.extensionapp  # type: ignore[return-value]

    def read_body(self) -> dict:
        try:
            body = json.loads(self.request.body or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return body

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, LlmNbError):
            self.set_status(exc.status)
            self.finish(json.dumps(exc.to_json()))
            return
        super().write_error(status_code, **kwargs)

    def log_exception(self, typ, value, tb) -> None:  # noqa: ANN001 - tornado's signature
        if isinstance(value, LlmNbError):  # an answer, not a bug: no traceback in the server log
            self.log.warning("llm-nb: %s %s: %s", self.request.method, self.request.path, value.message)
            return
        super().log_exception(typ, value, tb)

    async def _host(self, start: bool) -> dict:
        supervisor = self.ext.supervisor
        if start:
            return await supervisor.ensure_started()
        info = supervisor.info
        if info is None:
            raise HostUnavailable(
                f"the model host of this server is {supervisor.state}; load a model to start it", status=409
            )
        return info

    async def host_json(self, method: str, path: str, body: dict | None = None, *, start: bool = True) -> dict:
        """Call the host and return its JSON; a host error becomes the same ``LlmNbError``."""
        status, payload, _ = await self.host_raw(method, path, body, start=start)
        if status >= 400:
            raise error_answer(status, payload)
        return json.loads(payload)

    async def host_raw(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        start: bool = True,
        params: dict | list | None = None,
        data: bytes | None = None,
    ) -> tuple[int, bytes, str]:
        """Call the host with ``body`` as JSON, or ``data`` as it came (a JSON body passed on untouched)."""
        info = await self._host(start)
        headers = _auth(info)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self.ext.http().request(
                method, info["url"] + path, json=body, data=data, params=params, headers=headers
            ) as response:
                return response.status, await response.read(), response.content_type
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise _host_gone(exc) from None

    def pass_through(self, status: int, payload: bytes, content_type: str) -> None:
        self.set_status(status)
        self.finish(payload, set_content_type=content_type or "application/json")


def _auth(info: dict) -> dict:
    return {"Authorization": f"Bearer {info['key']}"}


def _host_gone(exc: BaseException) -> HostUnavailable:
    why = str(exc) or f"nothing for {stream_read_timeout():.0f} s, not even a heartbeat"
    return HostUnavailable(
        f"the model host stopped answering ({why}); the LLM panel shows whether it is being restarted"
    )


class StatusHandler(LlmNbHandler):
    _track_activity = False  # an open panel must not keep an idle server from being culled

    @web.authenticated
    async def get(self) -> None:
        self.write_json(self.ext.hub.snapshot)


class EventsHandler(LlmNbHandler):
    """Server-sent events: the status snapshot now and after every change; a comment every 15 s."""

    _track_activity = False

    @web.authenticated
    async def get(self) -> None:
        hub = self.ext.hub
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # proxies (nginx, JupyterHub's) must not buffer the stream
        sent = -1
        while not hub.closed:
            if hub.version != sent:
                sent = hub.version
                self.write(f"event: status\ndata: {json.dumps(hub.snapshot)}\n\n")
            else:
                self.write(": keep-alive\n\n")
            try:
                await self.flush()
            except StreamClosedError:
                return
            await hub.wait(sent, KEEPALIVE_S)
        self.finish(set_content_type="text/event-stream")


class CatalogHandler(LlmNbHandler):
    @web.authenticated
    async def get(self) -> None:
        if self.ext.supervisor.info is not None:
            self.pass_through(*await self.host_raw("GET", "/api/catalog", start=False))
            return
        # No host yet: the same catalog, read here, so that opening the panel starts nothing.
        import asyncio

        from ..catalog import catalog_entries

        self.write_json({"models": await asyncio.to_thread(catalog_entries)})


class LoadHandler(LlmNbHandler):
    @web.authenticated
    async def post(self) -> None:
        body = self.read_body()
        if not isinstance(body.get("model"), str) or not body["model"].strip():
            raise InvalidRequest('name the model to load: {"model": "<alias or path>"}')
        request = {key: body[key] for key in LOAD_FIELDS if body.get(key) not in (None, "")}
        request["client"] = self.ext.panel_identity
        self.write_json(await self.host_json("POST", "/api/models/load", request))


class UnloadHandler(LlmNbHandler):
    """Unload from the panel: free the model now if nobody else holds it; ``force`` ends every lease."""

    @web.authenticated
    async def post(self) -> None:
        body = self.read_body()
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest('name the model to unload: {"model": "<name>", "force": false}')
        force = bool(body.get("force", False))
        panel = self.ext.panel_identity
        result = await self.host_json(
            "POST", "/api/models/unload", {"model": model, "force": force, "client": panel}, start=False
        )
        if not force and not result.get("unloaded"):
            if result.get("remaining_leases"):
                status = await self.host_json("GET", "/api/status", start=False)
                holders = [
                    self.ext.display_name(lease["name"])
                    for m in status.get("models", [])
                    if m["name"] == model
                    for lease in m.get("leases", [])
                    if lease["client"] != panel["id"]
                ]
                raise LlmNbError(
                    f"{model!r} is still held by {', '.join(holders) or 'other clients'}; "
                    "force-unload it to end their leases (their next call will fail)",
                    code="model_in_use",
                    status=409,
                    holders=holders,
                )
            # Nobody holds it any more: the panel asked to free it, so do not wait for keep-alive.
            released = result.get("released", [])
            result = await self.host_json(
                "POST", "/api/models/unload", {"model": model, "force": True, "client": panel}, start=False
            )
            result["released"] = released + result.get("released", [])
        self.write_json(result)


class ModelLogHandler(LlmNbHandler):
    @web.authenticated
    async def get(self, name: str) -> None:
        lines = self.get_argument("lines", "200")
        path = f"/api/models/{quote(name, safe='')}/logs"
        self.pass_through(*await self.host_raw("GET", path, start=False, params={"lines": lines}))


class DeploymentsHandler(LlmNbHandler):
    @web.authenticated
    async def get(self) -> None:
        if self.ext.supervisor.info is None:  # no host, no deployments; listing them starts nothing
            self.write_json({"deployments": []})
            return
        self.pass_through(*await self.host_raw("GET", "/api/deployments", start=False))


class UndeployHandler(LlmNbHandler):
    @web.authenticated
    async def post(self) -> None:
        name = self.read_body().get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest('name the deployment to undeploy: {"name": "<name>"}')
        self.write_json(await self.host_json("POST", "/api/deployments/undeploy", {"name": name}, start=False))


class DeploymentApiHandler(LlmNbHandler):
    """A deployment's API (``/models/<name>/``) behind Jupyter's auth: meta, or predict by GET or POST."""

    async def _forward(self, name: str) -> None:
        query = [
            (key, value.decode())
            for key, values in self.request.query_arguments.items()
            if key not in JUPYTER_QUERY_KEYS
            for value in values
        ]
        body = self.request.body if self.request.method == "POST" else None
        path = f"/models/{quote(name, safe='')}/"
        self.pass_through(*await self.host_raw(self.request.method, path, start=False, params=query, data=body))

    @web.authenticated
    async def get(self, name: str) -> None:
        await self._forward(name)

    @web.authenticated
    async def post(self, name: str) -> None:
        await self._forward(name)


class ChatHandler(LlmNbHandler):
    """A streamed chat completion: the host's server-sent events, passed on chunk by chunk."""

    @web.authenticated
    async def post(self) -> None:
        body = self.read_body()
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
        info = await self._host(start=True)
        streaming = False
        try:
            # The host's stream carries heartbeats: silence past a few of them means it hung or died.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=stream_read_timeout())
            async with self.ext.http().post(
                info["url"] + "/v1/chat/completions", json=body, headers=_auth(info), timeout=timeout
            ) as response:
                if response.status >= 400:
                    self.pass_through(response.status, await response.read(), response.content_type)
                    return
                self.set_header("Content-Type", "text/event-stream")
                self.set_header("Cache-Control", "no-cache")
                self.set_header("X-Accel-Buffering", "no")
                streaming = True
                async for chunk in response.content.iter_any():
                    self.write(chunk)
                    try:
                        await self.flush()
                    except StreamClosedError:
                        return  # the browser stopped reading; leaving closes the host stream, which cancels
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError) as exc:
            if not streaming:
                raise _host_gone(exc) from None
            error = _host_gone(exc).to_json()
            self.write(f"data: {json.dumps(error)}\n\n")
        self.finish(set_content_type="text/event-stream")


class HostHandler(LlmNbHandler):
    """The host process itself: its state, and start, restart or stop from the panel."""

    @web.authenticated
    async def get(self) -> None:
        self.write_json(self.ext.supervisor.describe())

    @web.authenticated
    async def post(self) -> None:
        action = self.read_body().get("action")
        supervisor = self.ext.supervisor
        if action == "start":
            await supervisor.ensure_started()
        elif action == "restart":
            await supervisor.restart()
        elif action == "stop":
            await supervisor.stop_host()
        else:
            raise InvalidRequest('action must be "start", "restart" or "stop"')
        self.write_json(supervisor.describe())


class HostLogHandler(LlmNbHandler):
    @web.authenticated
    async def get(self) -> None:
        try:
            lines = max(1, min(int(self.get_argument("lines", "200")), 10_000))
        except ValueError:
            raise InvalidRequest("lines must be a whole number") from None
        path = self.ext.supervisor.log_path
        text = tail(path, lines) if os.path.exists(path) else f"no host log yet at {path}"
        self.finish(text + "\n", set_content_type="text/plain; charset=utf-8")


def route_table() -> list[tuple[str, type[LlmNbHandler]]]:
    """Patterns relative to the server's base URL (the extension app prefixes it)."""
    base = "/llm-nb/api"
    return [
        (f"{base}/status", StatusHandler),
        (f"{base}/events", EventsHandler),
        (f"{base}/catalog", CatalogHandler),
        (f"{base}/models/load", LoadHandler),
        (f"{base}/models/unload", UnloadHandler),
        (rf"{base}/models/(?P<name>[^/]+)/logs", ModelLogHandler),
        (f"{base}/deployments", DeploymentsHandler),
        (f"{base}/deployments/undeploy", UndeployHandler),
        (r"/llm-nb/models/(?P<name>[^/]+)/?", DeploymentApiHandler),
        (f"{base}/chat", ChatHandler),
        (f"{base}/host", HostHandler),
        (f"{base}/host/log", HostLogHandler),
    ]
