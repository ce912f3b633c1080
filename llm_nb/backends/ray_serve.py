"""A deployment on Ray Serve: the same ``model.py``, run by replicas on a Ray cluster.

This worker process is the deployment's Ray driver. ``load`` connects to the
cluster, runs the folder as a Serve application of its own (one deployment,
``ModelPyReplica``) and waits until every replica's ``init`` has finished;
``predict`` sends each payload through the application's Serve handle. Each
replica loads ``model.py`` exactly as a local deployment's worker does
(``user_code.DeploymentBackend``): the contract of a ``model.py`` is the same
on both engines. A replica ends through Serve's graceful shutdown, which calls
``ModelPyReplica.__del__`` and so the user's ``cleanup``.

Redeploying under the same name updates the same application: Ray rolls the
replicas over to the new code, and the version that serves keeps its handle
until the host switches. Undeploy deletes the application.

Before it deploys, the driver checks that the replicas can be placed
(``ray_placement``): what can never fit on the cluster is refused at once, and
so is what cannot fit beside what runs now when the caller will not wait
(``wait_for_resources=0``). Otherwise it waits, saying every second why (the
replicas Ray has not placed, what each needs, what is free and which
applications hold the rest), and gives up after ``wait_for_resources``
seconds (default ``WAIT_FOR_RESOURCES_S`` on a cluster without an
autoscaler), removing the application it started. The host stopping the
driver during that wait (an undeploy) removes it too.

If the cluster goes away, this process ends (exit code ``CLUSTER_LOST_EXIT``)
with the reason in its log; the host marks the deployment failed and serves on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import getpass
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, RayError

from ..catalog import ModelSpec
from ..errors import InvalidRequest, LlmNbError, RayCannotFit, RayResourcesBusy
from .base import Backend, Progress
from .ray_placement import Placement, look, replica_ask, starting_replicas, uncreated_replicas
from .user_code import CLEANUP_TIMEOUT_S, DeploymentBackend, max_concurrency, predict_is_async

log = logging.getLogger("llm_nb.deployment.ray")
DEPLOYMENT = "model"  # the one Serve deployment inside each application
SERVE_NAMESPACE = "serve"  # where Serve names its replica actors
STATUS_EVERY_S = 1.0
CLUSTER_SILENT_S = 10.0  # status calls failing this long: the cluster is gone
CLUSTER_LOST_EXIT = 75
UNWIND_S = 10.0  # how long close() gives a load under way to see it is cancelled and clean up
WAIT_FOR_RESOURCES_S = 120.0  # replicas Ray cannot place, on a cluster that will not grow: then the deploy fails
_USER_LINE = re.compile(r"^\S*(Error|Exception)\b.*$", re.MULTILINE)


def app_prefix() -> str:
    """What this user's applications' names start with: ``llm-nb-USER-``."""
    return f"llm-nb-{re.sub(r'[^A-Za-z0-9_-]', '_', getpass.getuser())}-"


def app_name(name: str) -> str:
    """One Serve application per user and deployment name, so users sharing a cluster do not collide."""
    return app_prefix() + name


class ModelPyReplica:
    """One Ray replica of a deployment: the folder's model.py, loaded as a local deployment loads it."""

    def __init__(self, spec: dict):
        self.backend = DeploymentBackend(ModelSpec(**spec))
        self.backend.load(lambda message, fraction=None: None)

    async def __call__(self, payload: Any) -> dict:
        # Errors travel back as data: the driver rebuilds the same LlmNbError a local worker answers.
        try:
            return {"result": await self.backend.predict(payload), "pid": os.getpid()}
        except LlmNbError as exc:
            return {"error": exc.to_json()["error"], "status": exc.status}

    def __del__(self) -> None:  # Serve's graceful shutdown: the user's cleanup()
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


class RayServeBackend(Backend):
    name = "ray_deployment"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.options = dict(spec.options)
        self.app = app_name(spec.name)
        self.handle = None
        self._bound_app = None  # what serve.run deployed, kept to put it back after a failed redeploy
        #: Set by the host before it ends a version that a newer one replaced: the application is the new one's now.
        self.replaced = False
        self._status: dict = {"app_status": "DEPLOYING", "running": 0, "message": ""}
        self._status_ok = time.monotonic()
        self._closing = threading.Event()
        #: This driver put the application on the cluster (a fresh deploy, or one that finished): close() deletes it.
        self._owns_app = False
        self._load_ended = threading.Event()

    # --- deploy ----------------------------------------------------------------------
    def _replica_spec(self) -> dict:
        options = {k: v for k, v in self.options.items() if k not in _RAY_OPTIONS}
        return {"name": self.spec.name, "backend": "deployment", "path": self.spec.path, "options": options}

    def _serve_deployment(self):
        folder = Path(self.spec.path or ".")
        model_json = dict(self.options.get("model_json") or {})
        per_replica = max_concurrency(model_json, predict_is_async(folder / "model.py"))
        autoscaling = self.options.get("autoscaling")
        scale: dict[str, Any] = (
            {"autoscaling_config": autoscaling}
            if autoscaling
            else {"num_replicas": int(self.options.get("replicas", 1))}
        )
        self.parallel = per_replica * (
            int(autoscaling.get("max_replicas", 1)) if autoscaling else scale["num_replicas"]
        )
        extra = (
            {"ray_actor_options": self.options["ray_actor_options"]} if self.options.get("ray_actor_options") else {}
        )
        return serve.deployment(ModelPyReplica).options(
            name=DEPLOYMENT,
            max_ongoing_requests=per_replica,
            graceful_shutdown_timeout_s=CLEANUP_TIMEOUT_S + 5.0,
            graceful_shutdown_wait_loop_s=0.2,
            **scale,
            **extra,
        )

    def load(self, progress: Progress) -> None:
        try:
            self._load(progress)
        finally:
            self._load_ended.set()

    def _load(self, progress: Progress) -> None:
        address = self.options["ray_address"]
        progress(f"connecting to the Ray cluster at {address}", 0.05)
        ray.init(address=address, namespace="llm-nb", log_to_driver=False, logging_level=logging.WARNING)
        serve.start(proxy_location="Disabled")  # predictions come through the handle, never Serve's HTTP
        try:
            deployment = self._serve_deployment()
            app = deployment.bind(self._replica_spec())
        except (TypeError, ValueError) as exc:  # Ray's own check of replicas, autoscaling, ray_actor_options
            raise InvalidRequest(f"Ray Serve refused the deployment's options: {exc}") from None
        replacing = self.app in serve.status().applications
        self._check_placement(replacing)
        progress(f"starting {self._target_text()} on Ray (each runs init())", 0.1)
        self.handle = self._run(app, progress, replacing)
        self._bound_app = app
        self._owns_app = True
        self._refresh_status()
        threading.Thread(target=self._watch_cluster, name="ray-status", daemon=True).start()
        progress("ready", 1.0)

    # --- placement -------------------------------------------------------------------------
    def _initial_replicas(self) -> int:
        autoscaling = self.options.get("autoscaling")
        if autoscaling:
            return int(autoscaling.get("initial_replicas") or autoscaling.get("min_replicas") or 1)
        return int(self.options.get("replicas", 1))

    def _placement(self) -> Placement:
        ask = replica_ask(self.options.get("ray_actor_options"))
        return look(self.app, app_prefix(), ask, self._initial_replicas())

    def _wait_limit(self, placement: Placement) -> float | None:
        """Seconds to wait for replicas Ray cannot place; None: as long as the host's load timeout allows."""
        asked = self.options.get("wait_for_resources")
        if asked is not None:
            return float(asked)
        return None if placement.autoscaling else WAIT_FOR_RESOURCES_S

    def _check_placement(self, replacing: bool) -> None:
        """Refuse at once what can never fit, and what cannot fit now when the caller will not wait."""
        placement = self._placement()
        if placement.never_fits:
            raise RayCannotFit(placement.never_fits_text())
        # A redeploy's new replicas take the place of the old ones, which hold what they need.
        if not replacing and not placement.autoscaling and placement.fit_now < placement.replicas:
            if self._wait_limit(placement) == 0:
                raise RayResourcesBusy(placement.busy_text())

    def _run(self, app, progress: Progress, replacing: bool):
        """Deploy the application and wait until its replicas run, saying why while Ray cannot place them.

        A fresh application that fails, waits too long for resources or is cancelled is deleted;
        a redeploy's is left to the host, which puts the serving version back.
        """
        handle = serve._run(app, name=self.app, route_prefix=None, _blocking=False)
        if not replacing:
            self._owns_app = True
        waiting_since: float | None = None
        try:
            while True:
                self._refresh_status()
                state = self._status["app_status"]
                if state == "RUNNING":
                    return handle
                if state == "DEPLOY_FAILED":
                    raise self._deploy_error(RuntimeError(f"Deploying application {self.app} failed"))
                placement = self._placement()
                running = f"Ray: {self._status['running']} of {self._target_text()} running"
                if placement.pending:
                    waiting_since = waiting_since or time.monotonic()
                    waited = time.monotonic() - waiting_since
                    limit = self._wait_limit(placement)
                    why = placement.busy_text()
                    if limit is not None and waited >= limit:
                        raise RayResourcesBusy(
                            f"Ray could not place the replicas within {limit:g} s (--wait-for-resources): {why}"
                        )
                    self._status["waiting_for_resources"] = {**placement.to_json(), "waited_s": round(waited, 1)}
                    # Ray's own word (after its SLOW_STARTUP_WARNING_S) follows ours, which comes at once.
                    self._status["message"] = "\n".join(filter(None, (why, self._status.get("message"))))
                    progress(f"{running}; {why}", 0.5, ray=self._ray_facts())
                else:
                    waiting_since = None
                    progress(running, 0.5, ray=self._ray_facts())
                if self._closing.wait(STATUS_EVERY_S):
                    raise LlmNbError("the deploy was cancelled", code="deploy_cancelled", status=409)
        except BaseException:
            if self._owns_app:
                self._delete_app()
            raise

    def _delete_app(self) -> None:
        """Delete the application and wait until it is gone; its serving replicas' cleanup() runs."""
        self._owns_app = False
        # Serve asks each replica to shut down and gives it its whole graceful timeout (35 s); one that
        # never began to serve (unplaced, or still in init) cannot answer and has nothing to clean up.
        never_served = set(starting_replicas(self.app))
        ended: set[str] = set()
        try:
            serve.delete(self.app, _blocking=False)
            deadline = time.monotonic() + CLEANUP_TIMEOUT_S + 10.0
            while self.app in serve.status().applications and time.monotonic() < deadline:
                never_served |= {str(actor["Name"]) for actor in uncreated_replicas(self.app)}
                for actor in never_served - ended:
                    ended.add(actor)
                    with contextlib.suppress(Exception):  # gone meanwhile
                        ray.kill(ray.get_actor(actor, namespace=SERVE_NAMESPACE), no_restart=True)
                time.sleep(0.2)
            log.info("deleted the Serve application %s (ended %d replicas that never served)", self.app, len(ended))
        except Exception:
            log.exception("deleting the Serve application %s failed", self.app)

    def restore(self) -> None:
        """Put this version back on every replica: a newer version's rollout failed part way."""
        if self._bound_app is None:
            raise LlmNbError("this version never reached Ray: there is nothing to put back", code="invalid_request")
        self.handle = self._run(self._bound_app, lambda message, fraction=None, **facts: None, replacing=True)
        self._refresh_status()

    def _target_text(self) -> str:
        autoscaling = self.options.get("autoscaling")
        if autoscaling:
            return f"{autoscaling.get('min_replicas', 1)}-{autoscaling.get('max_replicas', 1)} replicas (autoscaling)"
        replicas = int(self.options.get("replicas", 1))
        return f"{replicas} replica{'s' * (replicas != 1)}"

    def _deploy_error(self, exc: BaseException) -> LlmNbError:
        text = str(exc)
        try:  # serve.run says only that it failed; the replicas' tracebacks are in the status
            self._refresh_status()
            text += "\n" + self._status.get("message", "")
        except Exception:
            pass
        # Ray's report ends in the replica's traceback; its last "SomeError: ..." line is the user's own.
        errors = [m.group(0) for m in _USER_LINE.finditer(text)]
        cause = errors[-1] if errors else (text.strip().splitlines() or [type(exc).__name__])[-1]
        cause = cause.removeprefix(f"{LlmNbError.__module__}.{LlmNbError.__name__}: ")
        log.error("deploying %s on Ray failed:\n%s", self.app, text)
        return LlmNbError(
            f"its replicas on Ray did not start: {cause}; the deployment log has Ray's whole report",
            code="load_failed",
        )

    # --- status and the cluster's health ------------------------------------------------
    def _refresh_status(self) -> None:
        status = serve.status().applications.get(self.app)
        if status is None:
            self._status = {"app_status": "NOT_STARTED", "running": 0, "message": ""}
        else:
            deployment = status.deployments.get(DEPLOYMENT)
            states = dict(deployment.replica_states) if deployment else {}
            self._status = {
                "app_status": str(getattr(status.status, "value", status.status)),
                "running": int(states.get("RUNNING", 0)),
                "replica_states": {str(k): v for k, v in states.items()},
                "message": _last_lines(
                    "\n".join(m for m in (status.message, deployment.message if deployment else "") if m)
                ),
            }
        if self.options.get("local_head"):
            self._status["rss_bytes"] = _replica_rss(self.app)
        self._status_ok = time.monotonic()

    def _watch_cluster(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            while not self._closing.wait(STATUS_EVERY_S):
                try:
                    pool.submit(self._refresh_status).result(timeout=CLUSTER_SILENT_S)
                except Exception as exc:  # a hung call or an error: the cluster may be gone
                    if time.monotonic() - self._status_ok >= CLUSTER_SILENT_S and not self._closing.is_set():
                        log.error(
                            "the Ray cluster at %s stopped answering for %.0f s (%s: %s); this deployment has failed",
                            self.options["ray_address"],
                            CLUSTER_SILENT_S,
                            type(exc).__name__,
                            exc,
                        )
                        logging.shutdown()
                        os._exit(CLUSTER_LOST_EXIT)

    def info(self) -> dict[str, Any]:
        autoscaling = self.options.get("autoscaling")
        return {
            "engine": "ray",
            "replicas": {
                "target": None if autoscaling else int(self.options.get("replicas", 1)),
                "running": self._status.get("running", 0),
                **(
                    {"min": autoscaling.get("min_replicas"), "max": autoscaling.get("max_replicas")}
                    if autoscaling
                    else {}
                ),
            },
            "ray": self._ray_facts(),
            "replicas_rss_bytes": self._status.get("rss_bytes"),
        }

    def _ray_facts(self) -> dict[str, Any]:
        """The application as Ray sees it; while replicas wait for resources, why (``waiting_for_resources``)."""
        facts = {
            "address": self.options.get("ray_address"),
            "local_head": bool(self.options.get("local_head")),
            "application": self.app,
            "status": self._status.get("app_status"),
            "replica_states": self._status.get("replica_states", {}),
            "message": self._status.get("message", ""),
        }
        if "waiting_for_resources" in self._status:
            facts["waiting_for_resources"] = self._status["waiting_for_resources"]
        return facts

    # --- requests ------------------------------------------------------------------------
    async def predict(self, payload: Any, **kwargs: Any) -> Any:
        if self.handle is None:
            raise LlmNbError("the deployment is not on Ray yet", code="model_loading", status=503)
        try:
            answer = await self.handle.remote(payload)
        except RayActorError as exc:
            raise LlmNbError(
                f"the Ray replica of {self.spec.name!r} that had this request died ({type(exc).__name__}); "
                "Ray starts a new one and the other replicas serve on",
                code="replica_died",
                status=502,  # not 503: clients must not resend a prediction that may have half run
            ) from None
        except (RayError, RuntimeError) as exc:
            raise LlmNbError(
                f"Ray could not serve this request to {self.spec.name!r}: {type(exc).__name__}: {exc}",
                code="ray_error",
                status=503,
            ) from None
        if "error" in answer:
            error = answer["error"]
            raise LlmNbError(error.get("message", "predict failed"), code=error.get("code"), status=answer["status"])
        return answer["result"]

    # --- undeploy ------------------------------------------------------------------------
    def close(self) -> None:
        """Undeploy, or a deploy cancelled while it waits: delete the application (each replica's
        cleanup() runs), unless a newer version owns it now or this one never put it there."""
        self._closing.set()
        # A deploy cancelled while it waits: its load sees the flag within a second and removes what it started.
        self._load_ended.wait(UNWIND_S)
        if self._owns_app and not self.replaced:
            self._delete_app()
        ray.shutdown()


#: Options the driver reads; the rest (model_json, files_dir, host_url, token, version) reach model.py.
_RAY_OPTIONS = ("ray_address", "local_head", "replicas", "autoscaling", "ray_actor_options", "wait_for_resources")


def _last_lines(text: str, lines: int = 12) -> str:
    """Ray's status message without its terminal colours, cut to its end (where the cause is)."""
    return "\n".join(_ANSI.sub("", text).strip().splitlines()[-lines:])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _replica_rss(app: str) -> int:
    """The replicas' memory, where the head is on this machine: Ray names their processes after the application."""
    import psutil

    marker = f"ServeReplica:{app}:"
    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and marker in cmdline[0] and proc.info.get("memory_info"):
            total += proc.info["memory_info"].rss
    return total
