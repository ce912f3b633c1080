"""Practicus-style deployments: a folder with ``model.py`` (and ``model.json``) served at ``/models/<name>/``.

``deploy(name, folder)`` copies the files that ``model.json`` names
(``download_files_from``: a local path, ``file://``, ``http(s)://`` or any
fsspec URL whose package is installed) into ``download_files_to`` (default:
the user cache dir), refusing any path that would land outside it; then it
starts a worker process (``llm_nb.backends.deployment``) that imports
``model.py`` and awaits ``init`` once. The host never imports user code: an
exception, ``sys.exit`` or ``os._exit`` in ``model.py`` costs that deployment
only.

Routes:

=====================================  ========================================
``GET|POST /models/<name>/``           a prediction; ``?get_meta=true``: metadata
``GET  /api/deployments``              the deployments this caller may see
``POST /api/deployments/deploy``       ``{"name", "folder"}`` (NDJSON progress with ``stream``)
``POST /api/deployments/undeploy``     ``{"name"}``: ``cleanup()``, then the worker ends
``GET  /api/deployments/<name>/logs``  the worker's log
``POST /api/deployments/<name>/use``   a lease on a host model, for ``use_model`` in model.py
=====================================  ========================================

A new deploy under a name that is live brings the new version up beside the
old one and switches only once ``init`` has succeeded; if it fails, the old
version goes on serving. The old one finishes the requests it has, then ends.

``model.json`` keys: ``download_files_from`` (a path or URL, or a list),
``download_files_to`` (a folder; relative paths are from the deployment
folder), ``max_concurrency`` (predictions at once; default 8 for an async
predict, 1 for a plain one), ``use_models`` (the models ``use_model`` may lease;
default: any).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from aiohttp import web

from ..catalog import ModelSpec, resolve
from ..config import Settings, heartbeat_interval, parse_duration
from ..errors import (
    BackendUnavailable,
    InvalidRequest,
    LlmNbError,
    ModelCrashed,
    ModelLoading,
    ModelNotFound,
    PermissionDenied,
    Timeout,
)
from . import memory
from .http import PRINCIPAL, read_json
from .registry import Lease, Registry
from .scheduler import ModelQueue
from .schemas import DeployRequest, UndeployRequest, UseModelRequest, parse
from .tokens import TokenIssuer
from .workers import WorkerProcess, describe_exit, tail

log = logging.getLogger("llm_nb.host.deployments")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHUNK = 1024 * 1024
DRAIN_S = 60.0
Progress = Callable[[dict], None]
routes = web.RouteTableDef()


def default_files_dir(name: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("llm-nb")) / "deployments" / name


# --- copying model files ------------------------------------------------------------
@dataclass
class _Planned:
    fs: Any
    source: str
    rel: str
    size: int | None


def _is_url(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def _safe_rel(rel: str, source: str) -> str:
    """A relative path that stays inside the target, or an error naming the culprit."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not parts or rel.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", rel):
        raise PermissionDenied(
            f"refusing to copy {source!r}: its path {rel!r} would land outside the download folder; "
            "rename it or fix download_files_from"
        )
    return "/".join(p for p in parts if p != ".")


def plan_copy(sources: list[str], base: Path) -> list[_Planned]:
    """Every file to copy: (filesystem, source path, path relative to the target, size)."""
    import fsspec

    planned: list[_Planned] = []
    for source in sources:
        if not isinstance(source, str) or not source.strip():
            raise InvalidRequest(f"download_files_from entries must be paths or URLs, not {source!r}")
        location = source if _is_url(source) else str((base / Path(source).expanduser()).resolve())
        try:
            fs, path = fsspec.core.url_to_fs(location)
        except (ImportError, ValueError) as exc:
            protocol = location.split("://", 1)[0]
            raise BackendUnavailable(
                f"cannot read {source!r}: {exc}. Install the fsspec package for {protocol}:// "
                f"(s3fs for s3, gcsfs for gs, adlfs for az) in the host's environment"
            ) from exc
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        web_like = protocol in ("http", "https")
        try:
            is_dir = fs.isdir(path)
            if not is_dir and not fs.exists(path):
                raise FileNotFoundError(path)
        except FileNotFoundError:
            raise ModelNotFound(f"download_files_from names {source!r}, which does not exist") from None
        except Exception as exc:  # any fsspec backend: auth, network
            raise LlmNbError(f"cannot read {source!r}: {type(exc).__name__}: {exc}", code="download_failed") from exc
        if is_dir:
            prefix = path.rstrip("/") + "/"
            found = fs.find(path, detail=True, withdirs=False)  # http needs the trailing slash kept
            for file_path, info in sorted(found.items()):
                if not file_path.startswith(prefix):
                    # An index page that links above its folder, or a symlink out of it.
                    _safe_rel("../" + file_path.rsplit("/", 1)[-1], file_path)
                rel = file_path[len(prefix) :]
                if web_like:
                    rel = urllib.parse.unquote(rel.split("?", 1)[0])
                planned.append(_Planned(fs, file_path, _safe_rel(rel, file_path), info.get("size")))
        else:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if web_like:
                name = urllib.parse.unquote(name.split("?", 1)[0])
            planned.append(_Planned(fs, path, _safe_rel(name, path), fs.info(path).get("size")))
    return planned


def copy_files(sources: list[str], base: Path, target: Path, progress: Progress) -> list[dict]:
    """Copy with progress; a file already there with the same size is kept (the cache)."""
    planned = plan_copy(sources, base)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    total = sum(p.size or 0 for p in planned)
    done = 0
    copied: list[dict] = []
    last = 0.0
    for index, item in enumerate(planned):
        dest = (root / item.rel).resolve()
        if not dest.is_relative_to(root):  # a symlink inside the target pointing out of it
            _safe_rel("../" + item.rel, item.source)
        if item.size is not None and dest.is_file() and dest.stat().st_size == item.size:
            done += item.size
            copied.append({"path": item.rel, "size": item.size, "cached": True})
            progress({"stage": "download", "file": item.rel, "bytes": done, "total": total, "files": index + 1})
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        size = 0
        try:
            with item.fs.open(item.source, "rb") as src, open(part, "wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    size += len(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last > 0.2:
                        last = now
                        progress({"stage": "download", "file": item.rel, "bytes": done, "total": total})
            os.replace(part, dest)
        except Exception as exc:
            part.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LlmNbError(
                    f"the disk under {target} is full: copying {item.source} stopped after {size} bytes "
                    f"({total} needed in all). Free space there, or point download_files_to in model.json "
                    "at a disk with room",
                    code="disk_full",
                    status=507,
                ) from exc
            raise LlmNbError(
                f"copying {item.source} to {dest} failed: {type(exc).__name__}: {exc}", code="download_failed"
            ) from exc
        copied.append({"path": item.rel, "size": size, "cached": False})
        progress({"stage": "download", "file": item.rel, "bytes": done, "total": total, "files": index + 1})
    return copied


# --- deployments ------------------------------------------------------------------------
class DeploymentWorker(WorkerProcess):
    def crashed_error(self) -> ModelCrashed:
        return ModelCrashed(
            self.crash_reason()
            + f"\ndeploy it again to start a fresh worker (`llm-nb deploy {self.spec.name} {self.spec.path}`)",
            exit=describe_exit(self.returncode),
        )

    async def predict(self, payload: Any, timeout: float | None) -> Any:
        return (await self._json("POST", "/predict", {"payload": payload}, timeout=timeout))["result"]


@dataclass
class Deployment:
    name: str
    folder: Path
    version: int
    model_json: dict
    instance: str = field(default_factory=lambda: secrets.token_hex(12))
    created: float = field(default_factory=time.time)
    state: str = "deploying"  # deploying, ready, failed, undeploying
    files_dir: Path | None = None
    files: list[dict] = field(default_factory=list)
    code_sha256: str = ""
    worker: DeploymentWorker | None = None
    queue: ModelQueue | None = None
    info: dict = field(default_factory=dict)
    requests_served: int = 0
    errors: int = 0
    failure: str | None = None
    progress: dict = field(default_factory=dict)
    deploy_seconds: float | None = None

    @property
    def lease_client(self) -> str:
        return f"deployment:{self.name}@{self.instance[:8]}"

    def meta(self, base_url: str) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "state": self.state,
            "model_json": self.model_json,
            "files": self.files,
            "files_dir": str(self.files_dir) if self.files_dir else None,
            "folder": str(self.folder),
            "code_sha256": self.code_sha256,
            "requests_served": self.requests_served,
            "errors": self.errors,
            "in_flight": self.queue.running if self.queue else 0,
            "waiting": self.queue.waiting if self.queue else 0,
            "max_concurrency": self.queue.slots if self.queue else None,
            "worker_pid": self.worker.pid if self.worker else None,
            "rss_bytes": memory.process_rss(self.worker.pid) if self.worker and self.worker.pid else 0,
            "deploy_seconds": self.deploy_seconds,
            "failure": self.failure,
            "api_url": f"{base_url}/models/{self.name}/",
            "log_file": str(self.worker.log_path) if self.worker else None,
        }


class DeploymentManager:
    def __init__(self, settings: Settings, registry: Registry, tokens: TokenIssuer, host_url: str):
        self.settings = settings
        self.registry = registry
        self.tokens = tokens
        self.host_url = host_url
        self.deployments: dict[str, Deployment] = {}
        self._instances: dict[str, Deployment] = {}  # live and coming up, by credential id
        self._locks: dict[str, asyncio.Lock] = {}
        self._versions: dict[str, int] = {}
        self._seq = 0
        tokens.deployment_alive = lambda instance: instance in self._instances
        registry.other_costs = self.memory_costs

    def memory_costs(self, kind: str) -> dict[str, int]:
        """What each live deployment worker holds now (RSS, or GPU bytes under a GPU budget).

        Its weights count against the models' budget like a model's would; models it leases
        through ``use_model`` are counted once, as those models.
        """
        costs: dict[str, int] = {}
        if not self._instances:
            return costs
        gpu_by_pid = memory.gpu_memory_by_pid() if kind == "gpu" else {}
        for dep in list(self._instances.values()):
            pid = dep.worker.pid if dep.worker and dep.worker.returncode is None else None
            if pid:
                measured = memory.measure(pid, gpu_by_pid)
                costs[f"deployment {dep.name} v{dep.version}"] = measured["gpu_bytes" if kind == "gpu" else "rss_bytes"]
        return costs

    # --- deploy ----------------------------------------------------------------------
    async def deploy(self, name: str, folder: str, progress: Progress = lambda event: None) -> Deployment:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequest(
                f"deployment name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if not isinstance(folder, str) or not folder:
            raise InvalidRequest("name the deployment folder (the one with model.py)")
        path = Path(folder).expanduser()
        if not path.is_absolute():
            raise InvalidRequest(f"the folder must be an absolute path on the host's machine, not {folder!r}")
        if not (path / "model.py").is_file():
            raise ModelNotFound(f"{path} has no model.py; a deployment folder needs one with predict(payload_dict)")
        async with self._locks.setdefault(name, asyncio.Lock()):
            return await self._deploy(name, path.resolve(), progress)

    async def _deploy(self, name: str, folder: Path, progress: Progress) -> Deployment:
        started = time.monotonic()
        model_json = await asyncio.to_thread(_read_model_json, folder)
        version = self._versions.get(name, 0) + 1
        dep = Deployment(name, folder, version, model_json)
        dep.code_sha256 = hashlib.sha256((folder / "model.py").read_bytes()).hexdigest()

        def report(event: dict) -> None:
            dep.progress = event
            progress(event)

        sources = model_json.get("download_files_from")
        if isinstance(sources, str):
            sources = [sources]
        target = model_json.get("download_files_to")
        if sources:
            if target is not None and not isinstance(target, str):
                raise InvalidRequest("model.json download_files_to must be a folder path")
            dep.files_dir = (folder / Path(target).expanduser()) if target else default_files_dir(name)
            report({"stage": "download", "message": f"copying model files to {dep.files_dir}"})
            loop = asyncio.get_running_loop()
            dep.files = await asyncio.to_thread(
                copy_files, list(sources), folder, dep.files_dir, lambda e: loop.call_soon_threadsafe(report, e)
            )
        elif target:
            dep.files_dir = folder / Path(target).expanduser()

        self._seq += 1
        dep.worker = DeploymentWorker(
            ModelSpec(
                name=name,
                backend="deployment",
                path=str(folder),
                source="deployment",
                options={
                    "version": version,
                    "model_json": model_json,
                    "files_dir": str(dep.files_dir) if dep.files_dir else None,
                    "host_url": self.host_url,
                    "token": self.tokens.issue_deployment(dep.instance, model_json.get("use_models")),
                },
            ),
            self.registry.runtime_dir / f"d{self._seq}.sock",
            self.registry.log_dir / f"deployment-{_safe(name)}.log",
            on_exit=self._worker_exited,
        )
        self._instances[dep.instance] = dep
        report({"stage": "init", "message": "starting the worker and running init()"})
        try:
            await dep.worker.start()

            def on_worker(event: dict) -> None:
                report({"stage": "init", "message": event.get("message"), "fraction": event.get("fraction")})

            dep.info = await asyncio.wait_for(dep.worker.load(on_worker), self.settings.load_timeout)
        except BaseException as exc:
            await self._stop(dep, kill=True)
            if isinstance(exc, TimeoutError):
                raise Timeout(
                    f"init() of {name!r} did not finish within {self.settings.load_timeout:.0f} s; "
                    f"see {dep.worker.log_path}"
                ) from None
            if isinstance(exc, LlmNbError) and exc.code in ("load_failed", "model_crashed"):
                exc.message = f"deploying {name!r} failed: {exc.message}"
                exc.args = (exc.message,)
            raise
        dep.queue = ModelQueue(name, int(dep.info.get("parallel", 1)), self.settings.max_queue)
        dep.state = "ready"
        dep.deploy_seconds = time.monotonic() - started
        dep.progress = {}
        self._versions[name] = version
        old = self.deployments.get(name)
        self.deployments[name] = dep
        log.info("deployed %s v%d from %s in %.2f s", name, version, folder, dep.deploy_seconds)
        if old is not None:
            await self._stop(old, drain=True)
        return dep

    # --- undeploy --------------------------------------------------------------------
    async def undeploy(self, name: str) -> dict:
        dep = self.deployments.get(name)
        if dep is None:
            raise ModelNotFound(f"no deployment {name!r}; deployed: {', '.join(self.deployments) or 'none'}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            if self.deployments.get(name) is dep:
                del self.deployments[name]
            await self._stop(dep)
        return {"name": name, "undeployed": True, "version": dep.version, "requests_served": dep.requests_served}

    async def _stop(self, dep: Deployment, kill: bool = False, drain: bool = False) -> None:
        """End the worker (its cleanup() runs on the way) and release the models it leased.

        ``drain``: a replaced version first finishes the requests it has taken (up to
        ``DRAIN_S``); new ones already go to its successor.
        """
        if drain and dep.queue is not None:
            deadline = time.monotonic() + DRAIN_S
            while dep.queue.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        dep.state = "undeploying"
        self._instances.pop(dep.instance, None)
        if dep.worker is not None:
            if kill:
                await dep.worker.kill()
            else:
                await dep.worker.stop(max(self.settings.worker_grace, 35.0))  # cleanup() may take its time
        for model_name, model in list(self.registry.models.items()):
            if dep.lease_client in model.leases:
                try:
                    await self.registry.unload(model_name, dep.lease_client)
                except LlmNbError:
                    pass

    async def _worker_exited(self, worker: WorkerProcess) -> None:
        if worker.stopping:
            return
        for dep in self.deployments.values():
            if dep.worker is worker:
                dep.state = "failed"
                dep.failure = worker.crash_reason()
                self._instances.pop(dep.instance, None)
                log.warning("deployment %s failed: %s", dep.name, dep.failure)

    async def shutdown(self) -> None:
        await asyncio.gather(*(self._stop(d) for d in list(self.deployments.values())), return_exceptions=True)
        self.deployments.clear()

    # --- requests --------------------------------------------------------------------
    def get(self, name: str) -> Deployment:
        dep = self.deployments.get(name)
        if dep is None:
            raise ModelNotFound(
                f"no deployment {name!r} on this host; deployed: {', '.join(self.deployments) or 'none'}. "
                f"Deploy it with llm_nb.deploy({name!r}, folder) or `llm-nb deploy {name} FOLDER`"
            )
        if dep.state == "failed":
            raise ModelCrashed(
                f"deployment {name!r} failed: {dep.failure}\n"
                f"deploy it again to start a fresh worker (`llm-nb deploy {name} {dep.folder}`)"
            )
        if dep.state != "ready":
            raise ModelLoading(f"deployment {name!r} is {dep.state}; retry in a few seconds", retry_after=2)
        return dep

    async def predict(self, name: str, payload: Any) -> Any:
        dep = self.get(name)
        async with dep.queue.slot():
            try:
                result = await dep.worker.predict(payload, timeout=self.settings.request_timeout)
            except LlmNbError:
                dep.errors += 1
                raise
            except TimeoutError:
                dep.errors += 1
                raise Timeout(f"predict() of {name!r} took longer than {self.settings.request_timeout:.0f} s") from None
        dep.requests_served += 1
        return result

    def by_instance(self, instance: str) -> Deployment | None:
        return self._instances.get(instance)

    def status_json(self, allowed: Callable[[str], bool]) -> list[dict]:
        return [d.meta(self.host_url) for d in self.deployments.values() if allowed(d.name)]


def _read_model_json(folder: Path) -> dict:
    path = folder / "model.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path} must hold a JSON object")
    return data


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


# --- routes -------------------------------------------------------------------------------
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
    request[PRINCIPAL].require(name)
    manager = manager_of(request)
    if _truthy(request.query.get("get_meta")):
        dep = manager.deployments.get(name)
        if dep is None:
            manager.get(name)  # the not-found error with its hint
        return web.json_response(await asyncio.to_thread(dep.meta, manager.host_url))
    if request.can_read_body:
        payload = await read_json(request)
    else:  # a bare GET: the query string is the payload
        payload = dict(request.query)
    return web.json_response(await manager.predict(name, payload))


@routes.get("/api/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    manager = manager_of(request)
    return web.json_response({"deployments": await asyncio.to_thread(manager.status_json, request[PRINCIPAL].allows)})


@routes.post("/api/deployments/deploy")
async def deploy(request: web.Request) -> web.StreamResponse:
    request[PRINCIPAL].require_admin()
    body = parse(DeployRequest, await read_json(request))
    manager = manager_of(request)
    events: asyncio.Queue = asyncio.Queue()
    started = time.monotonic()
    # The deploy is the manager's: a client that goes away does not leave half a deployment.
    task = asyncio.ensure_future(manager.deploy(body.name, body.folder, events.put_nowait))

    def done_event() -> dict:
        dep = task.result()
        return {"deployment": dep.meta(manager.host_url), "seconds": time.monotonic() - started}

    if not body.stream:
        await asyncio.shield(task)
        return web.json_response(done_event())
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
        await response.write(b"".join((json.dumps({"event": "progress", **e}) + "\n").encode() for e in batch))
    try:
        event = {"event": "done", **done_event()}
    except LlmNbError as exc:
        event = {"event": "error", **exc.to_json(), "status": exc.status}
    await response.write((json.dumps(event) + "\n").encode())
    await response.write_eof()
    return response


@routes.post("/api/deployments/undeploy")
async def undeploy(request: web.Request) -> web.Response:
    request[PRINCIPAL].require_admin()
    body = parse(UndeployRequest, await read_json(request))
    return web.json_response(await manager_of(request).undeploy(body.name))


@routes.get("/api/deployments/{name}/logs")
async def deployment_logs(request: web.Request) -> web.Response:
    request[PRINCIPAL].require_admin()
    manager = manager_of(request)
    name = request.match_info["name"]
    dep = manager.deployments.get(name)
    path = dep.worker.log_path if dep and dep.worker else manager.registry.log_dir / f"deployment-{_safe(name)}.log"
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
    elif principal.kind == "key":
        dep = manager.deployments.get(name)
        if dep is None:
            manager.get(name)
    else:
        raise PermissionDenied("session tokens cannot lease models; use_model runs inside a deployment")
    body = parse(UseModelRequest, await read_json(request))
    spec = await asyncio.to_thread(resolve, body.model, name=body.name, options=body.options)
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
    return web.json_response(
        {"model": model.status_json(manager.registry.budget_kind), "attached": attached, "lease": lease.to_json()}
    )


async def stop_all(app: web.Application) -> None:
    """Host shutdown: every deployment's cleanup() runs, then its worker ends."""
    await app["deployments"].shutdown()
