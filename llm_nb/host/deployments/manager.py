"""Deployments' lives: deploy, serve predictions, replace, undeploy.

``deploy(name, folder)`` copies the files that ``model.json`` names, then
starts a worker process (``llm_nb.backends.user_code``) that imports
``model.py`` and awaits ``init`` once; with ``engine="ray"`` that worker is
the deployment's Ray driver and the replicas on the cluster do both
(``llm_nb.backends.ray_serve``). The host never imports user code: an
exception, ``sys.exit`` or ``os._exit`` in ``model.py`` costs that deployment
only.

A deploy in progress is listed (``state: "deploying"``, bytes copied so far);
an undeploy of its name, or the host stopping, cancels it: its copy stops and
its partial files go, or its worker ends.

A new deploy under a name that is live brings the new version up beside the
old one and switches only once ``init`` has succeeded; if it fails, the old
version goes on serving. The old one finishes the requests it has, then ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...catalog import ModelSpec
from ...config import Settings
from ...errors import InvalidRequest, LlmNbError, ModelCrashed, ModelLoading, ModelNotFound, Timeout
from ..ray_cluster import RayCluster, require_ray
from ..registry import Registry
from ..scheduler import ModelQueue
from ..tokens import TokenIssuer
from ..workers import WorkerProcess, safe_name
from .files import CopyJob, CopyLimits, Progress
from .sources import files_to_copy, read_model_json
from .versions import Deployment, DeploymentWorker, LiveDeployments

log = logging.getLogger("llm_nb.host.deployments")
#: A name, or on a JupyterHub's shared host "USER~NAME" (a user's own; see http.OWNER_SEP).
NAME_RE = re.compile(r"^(?:[^~/\\\s]{1,128}~)?[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DRAIN_S = 60.0
CLEANUP_GRACE_S = 35.0  # cleanup() may take its time, except while the host stops
UNWIND_S = 5.0  # a cancelled deploy's stage: kill its worker or drop its partial files


class DeploymentManager:
    def __init__(
        self, settings: Settings, registry: Registry, tokens: TokenIssuer, host_url: str, live: LiveDeployments
    ):
        self.settings = settings
        self.registry = registry
        self.tokens = tokens
        self.host_url = host_url
        self.live = live
        self.deployments: dict[str, Deployment] = {}
        self.pending: dict[str, Deployment] = {}  # deploys in progress, not serving yet
        self._stop_deadline: float | None = None  # set once the host stops
        self._locks: dict[str, asyncio.Lock] = {}
        self._versions: dict[str, int] = {}
        self._seq = 0
        self.ray = RayCluster(settings, registry.log_dir, self._ray_cluster_lost)

    # --- deploy ----------------------------------------------------------------------
    async def deploy(
        self,
        name: str,
        folder: str,
        progress: Progress = lambda event: None,
        engine: str = "local",
        engine_options: dict | None = None,
    ) -> Deployment:
        """Deploy ``folder`` as ``name``; ``engine="ray"`` runs it on Ray Serve with ``engine_options``
        (``replicas``, ``autoscaling``, ``ray_actor_options``, ``wait_for_resources``)."""
        engine_options = {k: v for k, v in (engine_options or {}).items() if v is not None}
        if engine not in ("local", "ray"):
            raise InvalidRequest(f"engine must be 'local' or 'ray', not {engine!r}")
        if engine == "local" and engine_options:
            raise InvalidRequest(f"{', '.join(sorted(engine_options))} apply to engine='ray' only")
        if engine == "ray":
            require_ray()
            if "replicas" in engine_options and "autoscaling" in engine_options:
                raise InvalidRequest("give replicas or autoscaling, not both: autoscaling sets the replica count")
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
            return await self._deploy(name, path.resolve(), progress, engine, engine_options)

    async def _deploy(
        self, name: str, folder: Path, progress: Progress, engine: str, engine_options: dict
    ) -> Deployment:
        if self._stop_deadline is not None:
            raise _host_stopping(name)
        started = time.monotonic()
        dep = await self._new_version(name, folder)
        dep.engine, dep.engine_options = engine, engine_options

        def report(event: dict) -> None:
            dep.progress = event
            progress(event)

        self.pending[name] = dep
        try:
            await self._unless_cancelled(dep, self._copy_files(dep, report))
            try:
                await self._unless_cancelled(dep, self._start_worker(dep, report))
            except BaseException:
                await self._restore_serving(dep)
                raise
            if dep.cancel_error is not None:  # cancelled as init() finished
                await self._stop(dep, kill=True)
                raise dep.cancel_error
            dep.deploy_seconds = time.monotonic() - started
            await self._switch_to(dep)
        finally:
            if self.pending.get(name) is dep:
                del self.pending[name]
            dep.settled.set()
        return dep

    async def _unless_cancelled(self, dep: Deployment, stage_coro) -> Any:
        """Run one stage of a deploy; an undeploy or the host stopping ends it at once."""
        stage = asyncio.ensure_future(stage_coro)
        cancelled = asyncio.ensure_future(dep.cancelled.wait())
        try:
            await asyncio.wait({stage, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            stage.cancel()
            raise
        finally:
            cancelled.cancel()
        if not stage.done():
            stage.cancel()  # the stage's own handlers kill its worker or drop its partial files
            await asyncio.wait({stage}, timeout=UNWIND_S)
            raise dep.cancel_error
        return stage.result()

    def _cancel(self, dep: Deployment, error: LlmNbError) -> None:
        if dep.cancel_error is None:
            dep.cancel_error = error
            dep.state = "undeploying"
            log.info("cancelling the deploy of %s v%d: %s", dep.name, dep.version, error.message)
        dep.cancelled.set()
        if dep.copy_job is not None:
            dep.copy_job.cancel(error)  # now, from here: its thread may be stuck in a read

    async def _new_version(self, name: str, folder: Path) -> Deployment:
        model_json = await asyncio.to_thread(read_model_json, folder)
        dep = Deployment(name, folder, self._versions.get(name, 0) + 1, model_json)
        dep.code_sha256 = hashlib.sha256((folder / "model.py").read_bytes()).hexdigest()
        return dep

    async def _copy_files(self, dep: Deployment, report: Progress) -> None:
        sources, dep.files_dir = files_to_copy(dep.model_json, dep.folder, dep.name)
        if not sources:
            return
        report({"stage": "download", "message": f"copying model files to {dep.files_dir}"})
        loop = asyncio.get_running_loop()
        dep.copy_job = CopyJob(
            sources,
            dep.folder,
            dep.files_dir,
            CopyLimits.from_settings(self.settings),
            lambda e: loop.call_soon_threadsafe(report, e),
        )
        if dep.cancel_error is not None:
            raise dep.cancel_error
        dep.files = await dep.copy_job.run()

    async def _worker_spec(self, dep: Deployment, report: Progress) -> ModelSpec:
        options = {
            "version": dep.version,
            "model_json": dep.model_json,
            "files_dir": str(dep.files_dir) if dep.files_dir else None,
            "host_url": self.host_url,
            "token": self.tokens.issue_deployment(dep.instance, dep.model_json.get("use_models")),
        }
        if dep.engine == "ray":
            # The worker is the deployment's Ray driver; the replicas load model.py on the cluster.
            options.update(dep.engine_options, ray_address=await self.ray.address(report), local_head=self.ray.owned)
        backend = "ray_deployment" if dep.engine == "ray" else "deployment"
        return ModelSpec(name=dep.name, backend=backend, path=str(dep.folder), source="deployment", options=options)

    async def _start_worker(self, dep: Deployment, report: Progress) -> None:
        """Start the worker and await the user's ``init()``; on any failure the worker ends."""
        spec = await self._worker_spec(dep, report)
        self._seq += 1
        dep.worker = DeploymentWorker(
            spec,
            self.registry.runtime_dir / f"d{self._seq}.sock",
            self.log_path(dep.name),
            on_exit=self._worker_exited,
            env=self.ray.driver_env() if dep.engine == "ray" else None,
        )
        self.live.add(dep)
        report({"stage": "init", "message": "starting the worker and running init()"})

        def on_worker(event: dict) -> None:
            facts = {"ray": event["ray"]} if "ray" in event else {}  # why Ray's replicas wait, while they do
            report({"stage": "init", "message": event.get("message"), "fraction": event.get("fraction"), **facts})

        try:
            await dep.worker.start()
            dep.info = await asyncio.wait_for(dep.worker.load(on_worker), self.settings.load_timeout)
        except BaseException as exc:
            # A Ray driver is asked to end, not killed: it removes the Serve application it started
            # (a deploy cancelled while its replicas wait for resources must not leave them waiting).
            await self._stop(dep, kill=dep.engine != "ray")
            if isinstance(exc, TimeoutError):
                raise Timeout(
                    f"init() of {dep.name!r} did not finish within {self.settings.load_timeout:.0f} s; "
                    f"see {dep.worker.log_path}"
                ) from None
            if isinstance(exc, LlmNbError) and exc.code in ("load_failed", "model_crashed"):
                exc.message = f"deploying {dep.name!r} failed: {exc.message}"
                exc.args = (exc.message,)
            raise

    async def _restore_serving(self, failed: Deployment) -> None:
        """On Ray a redeploy rolls the serving version's replicas over; one that fails part way is rolled back."""
        serving = self.deployments.get(failed.name)
        if failed.engine != "ray" or serving is None or serving.engine != "ray" or serving.state != "ready":
            return
        if self._stop_deadline is not None:
            return  # the host is stopping: the application goes with it
        log.warning("the redeploy of %s failed: putting v%d back on every replica", failed.name, serving.version)
        try:
            await serving.worker.restore(self.settings.load_timeout)
        except LlmNbError as exc:
            log.error("putting %s v%d back failed: %s", failed.name, serving.version, exc.message)

    async def _switch_to(self, dep: Deployment) -> None:
        """Serve ``dep`` from now on; the version it replaces drains, then ends."""
        dep.queue = ModelQueue(dep.name, int(dep.info.get("parallel", 1)), self.settings.max_queue)
        dep.state = "ready"
        dep.progress = {}
        self._versions[dep.name] = dep.version
        old = self.deployments.get(dep.name)
        self.deployments[dep.name] = dep
        if self.pending.get(dep.name) is dep:
            del self.pending[dep.name]
        log.info("deployed %s v%d from %s in %.2f s", dep.name, dep.version, dep.folder, dep.deploy_seconds)
        if old is not None:
            await self._stop(old, drain=True)

    # --- undeploy --------------------------------------------------------------------
    async def undeploy(self, name: str) -> dict:
        """End ``name``: a deploy of it in progress is cancelled, the version that serves ends."""
        pending = self.pending.get(name)
        if pending is None and name not in self.deployments:
            raise ModelNotFound(f"no deployment {name!r}; deployed: {', '.join(self.deployments) or 'none'}")
        answer: dict = {"name": name, "undeployed": True}
        if pending is not None:
            self._cancel(
                pending,
                LlmNbError(
                    f"the deploy of {name!r} v{pending.version} was cancelled by an undeploy; "
                    "its partial files are removed. Deploy it again when you want it",
                    code="deploy_cancelled",
                    status=409,
                ),
            )
            try:
                await asyncio.wait_for(pending.settled.wait(), UNWIND_S + 1.0)
            except TimeoutError:
                log.warning("the cancelled deploy of %s v%d is slow to unwind", name, pending.version)
            answer.update(version=pending.version, requests_served=0, cancelled_deploy=pending.version)
        dep = self.deployments.get(name)  # read again: the cancelled deploy may have switched just before
        if dep is not None:
            async with self._locks.setdefault(name, asyncio.Lock()):
                if self.deployments.get(name) is dep:
                    del self.deployments[name]
                await self._stop(dep)
            answer.update(version=dep.version, requests_served=dep.requests_served)
        return answer

    async def _stop(self, dep: Deployment, kill: bool = False, drain: bool = False, grace: float | None = None) -> None:
        """End the worker (its cleanup() runs on the way) and release the models it leased.

        ``drain``: a replaced version first finishes the requests it has taken (up to
        ``DRAIN_S``); new ones already go to its successor. ``grace``: how long cleanup()
        may take before the worker is killed (default ``CLEANUP_GRACE_S``).
        """
        if drain and dep.queue is not None:
            deadline = time.monotonic() + DRAIN_S
            while dep.queue.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        dep.state = "undeploying"
        self.live.remove(dep)
        if dep.worker is not None:
            if kill:
                await dep.worker.kill()
            else:
                grace = grace if grace is not None else max(self.settings.worker_grace, CLEANUP_GRACE_S)
                await dep.worker.stop(grace, replaced=drain)
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
                self.live.remove(dep)
                log.warning("deployment %s failed: %s", dep.name, dep.failure)

    async def _ray_cluster_lost(self, reason: str) -> None:
        """The local Ray head ended under its deployments: they fail with the reason; the host serves on."""
        for dep in [*self.deployments.values(), *self.pending.values()]:
            if dep.engine == "ray" and dep.state in ("ready", "deploying"):
                dep.state, dep.failure = "failed", reason
                self.live.remove(dep)
                if dep.worker is not None:
                    await dep.worker.kill()

    async def refresh(self) -> None:
        """Ray deployments' live facts (replicas running, the application's status) from their drivers."""

        async def one(dep: Deployment) -> None:
            try:
                dep.info = {**dep.info, **await asyncio.wait_for(dep.worker.info(), 2.0)}
            except (LlmNbError, TimeoutError, OSError):
                pass  # a driver that is busy or gone: the last facts stand, its exit is reported apart

        ray_deps = [d for d in self.deployments.values() if d.engine == "ray" and d.worker and d.state == "ready"]
        await asyncio.gather(*(one(d) for d in ray_deps))

    def stopping(self, deadline: float) -> None:
        """The host stops: deploys in progress are cancelled now; ``shutdown`` ends by ``deadline`` (monotonic)."""
        self._stop_deadline = deadline
        for dep in list(self.pending.values()):
            self._cancel(dep, _host_stopping(dep.name))

    async def shutdown(self) -> None:
        """Every deployment's cleanup() runs, within what is left of the host's stop bound."""
        deadline = self._stop_deadline
        if deadline is None:
            deadline = time.monotonic() + CLEANUP_GRACE_S
            self.stopping(deadline)
        grace = max(0.5, min(CLEANUP_GRACE_S, deadline - time.monotonic() - 1.0))  # the kill below fits too
        ending = [self._stop(d, grace=grace) for d in list(self.deployments.values())]
        ending += [d.settled.wait() for d in list(self.pending.values())]
        try:
            await asyncio.wait_for(asyncio.gather(*ending, return_exceptions=True), grace + 1.0)
        except TimeoutError:
            log.warning("deployments did not end within %.1f s; their workers are killed", grace + 1.0)
            for dep in [*self.deployments.values(), *self.pending.values()]:
                if dep.worker is not None:
                    await dep.worker.kill()
        self.deployments.clear()
        await self.ray.stop()  # a local head this host started ends with it

    # --- requests --------------------------------------------------------------------
    def get(self, name: str) -> Deployment:
        dep = self.deployments.get(name)
        if dep is None and name in self.pending:
            raise ModelLoading(f"deployment {name!r} is still deploying; retry in a few seconds", retry_after=2)
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
        return self.live.get(instance)

    def log_path(self, name: str) -> Path:
        """Where every version of ``name`` writes its worker's log, one after the other."""
        return self.registry.log_dir / f"deployment-{safe_name(name)}.log"

    def status_json(self, allowed: Callable[[str], bool]) -> list[dict]:
        """The deployments that serve, then the deploys in progress (a redeploy's new version beside its old)."""
        listed = [*self.deployments.values(), *(d for d in self.pending.values() if d.state == "deploying")]
        return [d.meta(self.host_url) for d in listed if allowed(d.name)]


def _host_stopping(name: str) -> LlmNbError:
    return LlmNbError(
        f"the host is stopping: the deploy of {name!r} was cancelled. Deploy it again once a host runs",
        code="host_stopping",
        status=503,
    )
