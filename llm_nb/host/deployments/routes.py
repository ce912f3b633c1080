"""The deployments' routes: predictions at ``/models/<name>/``, the rest under ``/api/deployments``."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from ...catalog import resolve
from ...config import heartbeat_interval, parse_duration
from ...errors import LlmNbError, ModelNotFound, PermissionDenied
from ..http import PRINCIPAL, dumps, end_progress, json_response, read_json
from ..loaded import Lease
from ..schemas import DeployRequest, UndeployRequest, UseModelRequest, parse
from ..workers import tail
from .manager import DeploymentManager
from .versions import scoped_meta

routes = web.RouteTableDef()


def manager_of(request: web.Request) -> DeploymentManager:
    return request.app["deployments"]


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


@routes.route("*", "/models/{name:[^/]+}")
@routes.route("*", "/models/{name:[^/]+}/")
async def model_api(request: web.Request) -> web.Response:
    """A deployment's API: GET or POST a JSON payload; ``?get_meta=true`` for its metadata."""
    if request.method not in ("GET", "POST"):
        raise LlmNbError(
            f"{request.method} is not allowed on {request.path}; use GET or POST", code="method_not_allowed", status=405
        )
    name = request.match_info["name"]
    request[PRINCIPAL].require_deployment(name)
    manager = manager_of(request)
    if _truthy(request.query.get("get_meta")):
        dep = manager.deployments.get(name)
        if dep is None:
            manager.get(name)  # the not-found error with its hint
        await manager.refresh()
        meta = await asyncio.to_thread(dep.meta, manager.host_url)
        return json_response(meta if request[PRINCIPAL].kind == "key" else scoped_meta(meta))
    if request.can_read_body:
        payload = await read_json(request)
    else:  # a bare GET: the query string is the payload
        payload = dict(request.query)
    return json_response(await manager.predict(name, payload))


@routes.get("/api/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    manager = manager_of(request)
    await manager.refresh()
    principal = request[PRINCIPAL]
    listed = await asyncio.to_thread(manager.status_json, principal.may_use_deployment)
    return json_response({"deployments": listed if principal.kind == "key" else [scoped_meta(d) for d in listed]})


@routes.post("/api/deployments/deploy")
async def deploy(request: web.Request) -> web.StreamResponse:
    principal = request[PRINCIPAL]
    principal.require_admin()
    body = parse(DeployRequest, await read_json(request))
    if principal.user is not None:
        _check_user_deploys(request)
        body.name = principal.deployment_name(body.name)
        principal.require_deployment(body.name)
    manager = manager_of(request)
    events: asyncio.Queue = asyncio.Queue()
    started = time.monotonic()
    # The deploy is the manager's: a client that goes away does not leave half a deployment.
    engine_options = {
        "replicas": body.replicas,
        "autoscaling": body.autoscaling,
        "ray_actor_options": body.ray_actor_options,
        "wait_for_resources": body.wait_for_resources,
    }
    task = asyncio.ensure_future(
        manager.deploy(body.name, body.folder, events.put_nowait, engine=body.engine, engine_options=engine_options)
    )
    # Its error is the client's; one that went away (or was cancelled) must not leave it unretrieved.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def done_event() -> dict:
        dep = task.result()
        return {"deployment": dep.meta(manager.host_url), "seconds": time.monotonic() - started}

    if not body.stream:
        await asyncio.shield(task)
        return json_response(done_event())
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    heartbeat = heartbeat_interval()
    while not task.done():
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait([task, getter], timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            if not task.done():  # init() is still running: a blank line tells the reader the host is alive
                await response.write(b"\n")
            continue
        batch = [getter.result()]
        while not events.empty():  # copy_files throttles its own events: pass them all on
            batch.append(events.get_nowait())
        await response.write(b"".join((dumps({"event": "progress", **e}) + "\n").encode() for e in batch))
    return await end_progress(response, done_event)


@routes.post("/api/deployments/undeploy")
async def undeploy(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    principal.require_admin()
    body = parse(UndeployRequest, await read_json(request))
    name = principal.deployment_name(body.name)
    principal.require_deployment(name)
    return json_response(await manager_of(request).undeploy(name))


def _check_user_deploys(request: web.Request) -> None:
    """A deployment runs its model.py inside the shared host's service account: on a JupyterHub, only
    admins deploy unless the operator lets users (LLM_NB_HUB_USER_DEPLOYS=1, e.g. a sandboxed service)."""
    principal = request[PRINCIPAL]
    if principal.is_operator or request.app["hub"].user_deploys:
        return
    raise PermissionDenied(
        "deployments run their model.py as the shared host's service account, so on this JupyterHub only admins "
        "deploy; ask one, or ask the operator to set LLM_NB_HUB_USER_DEPLOYS=1 for the llm-nb service"
    )


@routes.get("/api/deployments/{name}/logs")
async def deployment_logs(request: web.Request) -> web.Response:
    request[PRINCIPAL].require_admin()
    name = request[PRINCIPAL].deployment_name(request.match_info["name"])
    request[PRINCIPAL].require_deployment(name)
    path = manager_of(request).log_path(name)
    if not path.exists():
        raise ModelNotFound(f"no log for deployment {name!r} on this host")
    return web.Response(text=tail(path, 500) + "\n", content_type="text/plain")


@routes.post("/api/deployments/{name}/use")
async def use_model(request: web.Request) -> web.Response:
    """A lease on a host model for a deployment's model.py (``llm_nb.deployment.use_model``)."""
    principal = request[PRINCIPAL]
    manager = manager_of(request)
    name = request.match_info["name"]
    if principal.kind == "deployment":
        dep = manager.by_instance(principal.subject)
        if dep is None or dep.name != name:
            raise PermissionDenied("a deployment's credential may lease models for that deployment only")
    elif principal.kind == "key" or principal.is_operator:
        dep = manager.deployments.get(name)
        if dep is None:
            manager.get(name)
    else:
        raise PermissionDenied("session tokens cannot lease models; use_model runs inside a deployment")
    body = parse(UseModelRequest, await read_json(request))
    catalog = manager.settings.catalog_file
    spec = await asyncio.to_thread(resolve, body.model, name=body.name, options=body.options, catalog_path=catalog)
    request[PRINCIPAL].require(spec.name)
    pid = dep.worker.pid if dep.worker else None
    started = None
    if pid:
        import psutil

        try:
            started = psutil.Process(pid).create_time()
        except psutil.Error:
            pass
    lease = Lease(client=dep.lease_client, name=f"deployment {dep.name} v{dep.version}", pid=pid, pid_started=started)
    keep_alive = parse_duration(body.keep_alive) if body.keep_alive is not None else None
    model, attached = await manager.registry.load(spec, lease, keep_alive)
    return json_response(
        {"model": model.status_json(manager.registry.budget_kind), "attached": attached, "lease": lease.to_json()}
    )


async def stop_all(app: web.Application) -> None:
    """Host shutdown: deploys in progress are cancelled, every deployment's cleanup() runs, its worker ends.

    Within the bound that ``serve`` set through ``DeploymentManager.stopping``.
    """
    await app["deployments"].shutdown()
