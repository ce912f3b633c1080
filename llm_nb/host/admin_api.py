"""Admin routes under ``/api`` for the magics, the CLI and the panels."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from .._version import __version__
from ..catalog import catalog_entries, resolve
from ..config import heartbeat_interval, parse_duration
from ..errors import InvalidRequest, ModelNotFound
from .deployments.versions import scoped_meta
from .http import PRINCIPAL, dumps, end_progress, json_response, read_json
from .loaded import Lease
from .registry import Registry
from .schemas import LoadRequest, UnloadRequest, parse
from .workers import tail

routes = web.RouteTableDef()


def registry_of(request: web.Request) -> Registry:
    return request.app["registry"]


#: What a session token sees of a model it is scoped to: its state and use, not the host's
#: files or processes (paths, logs, pids).
_SCOPED_MODEL_FIELDS = (
    "name",
    "backend",
    "device",
    "state",
    "memory_bytes",
    "in_flight",
    "waiting",
    "requests_served",
    "loaded_at",
    "last_used",
    "keep_alive",
    "expires_at",
    "task",
)
#: How often an event stream looks for deployment changes: the manager announces none of its own.
DEPLOYMENT_POLL_S = 1.0


def status_json(request: web.Request) -> dict:
    app = request.app
    status = registry_of(request).status_json()
    principal = request[PRINCIPAL]
    deployments = app["deployments"].status_json(principal.allows)
    if principal.kind != "key":
        # A session token opens the models it names, not the host: no budget, pid, url or paths.
        models = [m for m in status["models"] if principal.allows(m["name"])]
        return {
            "models": [{k: m.get(k) for k in _SCOPED_MODEL_FIELDS} for m in models],
            "deployments": [scoped_meta(d) for d in deployments],
            "version": __version__,
        }
    status.update(
        deployments=deployments,
        pid=app["info"]["pid"],
        version=__version__,
        url=app["info"]["url"],
        started=app["info"]["started"],
        uptime=time.time() - app["info"]["started"],
    )
    return status


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "version": __version__, "pid": request.app["info"]["pid"]})


@routes.get("/api/status")
async def status(request: web.Request) -> web.Response:
    await request.app["deployments"].refresh()  # Ray replicas running now
    return json_response(status_json(request))


def _deployments_shown(request: web.Request) -> list[tuple]:
    """What a status reader sees change in the deployments (not memory, which moves all the time)."""
    listed = request.app["deployments"].status_json(request[PRINCIPAL].allows)
    keys = ("name", "version", "engine", "state", "requests_served", "errors")
    return [(*(d[k] for k in keys), dumps(d["replicas"])) for d in listed]


@routes.get("/api/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the status, once now and again after every change."""
    registry = registry_of(request)
    deployments = request.app["deployments"]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    version, shown = -1, None
    heartbeat = heartbeat_interval()
    written = refreshed = time.monotonic()
    stop = request.app["stop_event"]
    while not stop.is_set():  # a host that is stopping ends the stream, so shutdown need not wait for it
        now = time.monotonic()
        if now - refreshed >= heartbeat:  # Ray replicas come and go without telling the manager
            await deployments.refresh()
            refreshed = now
        seen = _deployments_shown(request)
        if version != registry.version or seen != shown:
            version, shown, written = registry.version, seen, now
            await response.write(f"event: status\ndata: {dumps(status_json(request))}\n\n".encode())
        elif now - written >= heartbeat:
            written = now
            await response.write(b": keep-alive\n\n")
        changed = asyncio.ensure_future(registry.wait_change(version, timeout=min(heartbeat, DEPLOYMENT_POLL_S)))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({changed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        stopping.cancel()
    await response.write_eof()
    return response


@routes.get("/api/catalog")
async def catalog(request: web.Request) -> web.Response:
    entries = await asyncio.to_thread(catalog_entries, request.app["settings"].catalog_file)
    principal = request[PRINCIPAL]
    if principal.kind != "key":  # the aliases a token names, without their file paths
        entries = {
            name: {k: v for k, v in entry.items() if k in ("backend", "description", "task")}
            for name, entry in entries.items()
            if principal.allows(name)
        }
    return json_response({"models": entries})


def _lease(request: web.Request, client) -> Lease:
    data = client.model_dump() if client is not None else None
    return Lease.from_json(data, fallback=f"anonymous@{request.remote}")


@routes.post("/api/models/load")
async def load(request: web.Request) -> web.StreamResponse:
    request[PRINCIPAL].require_admin()
    body = parse(LoadRequest, await read_json(request))
    spec = await asyncio.to_thread(
        resolve,
        body.model,
        backend=body.backend,
        name=body.name,
        options=body.options,
        chat_format=body.chat_format,
        url=body.url,
        remote_model=body.remote_model,
        api_key_env=body.api_key_env,
        task=body.task,
        catalog_path=request.app["settings"].catalog_file,
    )
    keep_alive = parse_duration(body.keep_alive) if body.keep_alive is not None else None
    lease = _lease(request, body.client)
    registry = registry_of(request)
    started = time.monotonic()
    # The load is the registry's task: if this request goes away, the load goes on.
    task = asyncio.ensure_future(registry.load(spec, lease, keep_alive, api_key=body.api_key))

    def result() -> dict:
        model, attached = task.result()
        others = [lease_.name for lease_ in model.leases.values() if lease_.client != lease.client]
        return {
            "model": model.status_json(registry.budget_kind),
            "attached": attached,
            "lease": lease.to_json(),
            "other_holders": others,
            "seconds": time.monotonic() - started,
        }

    if not body.stream:
        await asyncio.shield(task)
        return json_response(result())

    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    heartbeat, written = heartbeat_interval(), time.monotonic()
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        model = registry.models.get(spec.name)
        if not task.done() and model is not None and model.state == "loading":
            event = {"event": "progress", **(model.progress or {}), "elapsed": time.monotonic() - started}
            await response.write((dumps(event) + "\n").encode())
            written = time.monotonic()
        elif time.monotonic() - written >= heartbeat:  # waiting (for memory, for another load): say so
            await response.write(b"\n")
            written = time.monotonic()
    return await end_progress(response, result)


@routes.post("/api/models/unload")
async def unload(request: web.Request) -> web.Response:
    request[PRINCIPAL].require_admin()
    body = parse(UnloadRequest, await read_json(request))
    registry = registry_of(request)
    client = _lease(request, body.client).client
    if body.all:
        names = [name for name, m in registry.models.items() if body.force or client in m.leases]
        results = [await registry.unload(name, client, body.force) for name in names]
        return json_response({"results": results})
    if not body.model:
        raise InvalidRequest('name the model to unload, or pass "all": true')
    return json_response(await registry.unload(body.model, client, body.force))


@routes.get("/api/models/{name:.+}/logs")
async def logs(request: web.Request) -> web.Response:
    request[PRINCIPAL].require_admin()
    registry = registry_of(request)
    name = request.match_info["name"]
    try:
        lines = max(1, min(int(request.query.get("lines", "200")), 100_000))
    except ValueError:
        raise InvalidRequest("lines must be a whole number") from None
    model = registry.models.get(name)
    path = model.runner.log_path if model and model.runner else None
    if path is None:
        path = registry.log_dir / f"{name}.log"
        if path.parent != registry.log_dir:  # a "/" in the name: no log of ours, wherever it points
            path = None
    try:
        found = path is not None and path.is_file()
    except OSError:  # a name too long to be a file name (found by the fuzzer)
        found = False
    if not found:
        raise ModelNotFound(f"no log for model {name!r} on this host")
    return web.Response(text=tail(path, lines) + "\n", content_type="text/plain")


@routes.post("/api/shutdown")
async def shutdown(request: web.Request) -> web.Response:
    request[PRINCIPAL].require_admin()
    request.app["stop_event"].set()
    return json_response({"stopping": True, "pid": request.app["info"]["pid"]})
