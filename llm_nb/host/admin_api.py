"""Admin routes under ``/api`` for the magics, the CLI and the panels."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from .._version import __version__
from ..catalog import catalog_entries, resolve
from ..config import heartbeat_interval, parse_duration
from ..errors import InvalidRequest, ModelNotFound, PermissionDenied
from .deployments.versions import scoped_meta
from .http import PRINCIPAL, dumps, end_progress, json_response, read_json
from .loaded import Lease
from .registry import Registry
from .schemas import LoadRequest, UnloadRequest, parse
from .users import view_for
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
    deployments = app["deployments"].status_json(principal.may_use_deployment)
    if principal.kind == "user":
        return _user_status(request, status, deployments)
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


def _user_status(request: web.Request, status: dict, deployments: list[dict]) -> dict:
    """A Hub user's view: their own leases, others' as a count (admins: all), their share of the budget."""
    from .users import holdings

    user = request[PRINCIPAL].user
    hub = request.app["hub"]
    registry = registry_of(request)
    share, source = hub.shares.bytes_for(user, registry.budget_bytes)
    held = holdings(registry.models.values(), user.name, registry.budget_kind)
    status.update(
        models=view_for(status["models"], user),
        deployments=deployments,
        version=__version__,
        started=request.app["info"]["started"],
        pid=request.app["info"]["pid"],
        url=request.app["info"]["url"],
        user={"name": user.name, "admin": user.admin},
        share={"bytes": share, "source": source, "held_bytes": sum(part for _, part, _ in held)},
        hub=True,
    )
    if not user.admin:
        status.pop("other_bytes", None)  # other users' deployments by name
    return status


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    info = request.app["info"]
    return json_response(
        {"status": "ok", "version": __version__, "pid": info["pid"], "started": info["started"], "hub": info.get("hub")}
    )


@routes.get("/api/status")
async def status(request: web.Request) -> web.Response:
    await request.app["deployments"].refresh()  # Ray replicas running now
    return json_response(status_json(request))


def _deployments_shown(request: web.Request) -> list[tuple]:
    """What a status reader sees change in the deployments (not memory, which moves all the time)."""
    listed = request.app["deployments"].status_json(request[PRINCIPAL].may_use_deployment)
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
    if principal.kind not in ("key", "user"):  # the aliases a token names, without their file paths
        entries = {
            name: {k: v for k, v in entry.items() if k in ("backend", "description", "task")}
            for name, entry in entries.items()
            if principal.allows(name)
        }
    return json_response({"models": entries})


def _lease(request: web.Request, client) -> Lease:
    data = client.model_dump() if client is not None else None
    # A Hub user's lease is theirs, whatever the client says it is: the user comes from the Hub.
    return Lease.from_json(data, fallback=f"anonymous@{request.remote}", user=request[PRINCIPAL].user_name)


@routes.post("/api/models/load")
async def load(request: web.Request) -> web.StreamResponse:
    request[PRINCIPAL].require_admin()
    body = parse(LoadRequest, await read_json(request))
    if (body.options or {}).get("trust_remote_code"):  # the model's own code would run as the shared host
        request[PRINCIPAL].require_operator("loading with trust_remote_code on a JupyterHub's shared host")
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
    principal = request[PRINCIPAL]
    if principal.kind == "user" and not principal.is_operator:
        catalog = await asyncio.to_thread(catalog_entries, request.app["settings"].catalog_file)
        request.app["hub"].check_model_path(body.model or "", spec.path, catalog)
    keep_alive = parse_duration(body.keep_alive) if body.keep_alive is not None else None
    lease = _lease(request, body.client)
    registry = registry_of(request)
    started = time.monotonic()
    # The load is the registry's task: if this request goes away, the load goes on.
    task = asyncio.ensure_future(registry.load(spec, lease, keep_alive, api_key=body.api_key))

    user = request[PRINCIPAL].user

    def result() -> dict:
        model, attached = task.result()
        others = [lease_.name for lease_ in model.leases.values() if lease_.client != lease.client]
        shown = model.status_json(registry.budget_kind)
        if user is not None:  # other users' notebooks are theirs: a count, unless an admin asks
            shown = view_for([shown], user)[0]
            if not user.admin:
                others = [x.name for x in model.leases.values() if x.user == user.name and x.client != lease.client]
        return {
            "model": shown,
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
    principal = request[PRINCIPAL]
    client = _lease(request, body.client).client
    if body.all:
        names = [name for name, m in registry.models.items() if body.force or client in m.leases]
        if principal.kind == "user" and not principal.is_operator:  # "all" is all of one's own
            names = [
                n for n in names if client in registry.models[n].leases or not _others(registry.models[n], principal)
            ]
        for name in names:
            _check_force(registry, name, body.force, principal)
        results = [await _unload(registry, name, client, body.force, principal) for name in names]
        return json_response({"results": results})
    if not body.model:
        raise InvalidRequest('name the model to unload, or pass "all": true')
    _check_force(registry, body.model, body.force, principal)
    return json_response(await _unload(registry, body.model, client, body.force, principal))


async def _unload(registry: Registry, name: str, client: str, force: bool, principal) -> dict:
    model = registry.models.get(name)
    taken_from = _others(model, principal) if model is not None and force else []
    result = await registry.unload(name, client, force)
    if principal.kind == "user":
        result["taken_from_users"] = taken_from  # a force-unload says whom it took the model from
    return result


def _others(model, principal) -> list[str]:
    """The other users who hold ``model``."""
    return sorted({lease.user or lease.name for lease in model.leases.values() if lease.user != principal.user_name})


def _check_force(registry: Registry, name: str, force: bool, principal) -> None:
    """A force-unload takes a model from everyone who holds it: from other users, only an admin may."""
    model = registry.models.get(name)
    if not force or model is None or principal.kind != "user":
        return
    others = _others(model, principal)
    if others and not principal.is_operator:
        raise PermissionDenied(
            f"{name!r} is held by {len(others)} other user{'s' if len(others) != 1 else ''} too: force-unloading it "
            "would take it from them, which only a JupyterHub admin (or a user with the custom:llm-nb:admin scope) "
            f"may do. Unload without force to release your own lease."
        )


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
    principal = request[PRINCIPAL]
    if principal.kind == "user" and not principal.is_operator:
        if model is None or all(lease.user != principal.user_name for lease in model.leases.values()):
            raise PermissionDenied(f"the log of {name!r} is for its holders and the Hub's admins; load it first")
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
    request[PRINCIPAL].require_operator("stopping the shared host")
    request.app["stop_event"].set()
    return json_response({"stopping": True, "pid": request.app["info"]["pid"]})
