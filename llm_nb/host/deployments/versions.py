"""One deployed version: the worker that runs it, and what it reports.

``Deployment`` is a version's facts (its engine, state, counters, metadata);
``LiveDeployments`` indexes the versions whose workers run, for the registry's
memory budget and the token issuer.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import LlmNbError, ModelCrashed
from .. import memory
from ..scheduler import ModelQueue
from ..workers import WorkerProcess, describe_exit
from .files import CopyJob


class DeploymentWorker(WorkerProcess):
    def crashed_error(self) -> ModelCrashed:
        return ModelCrashed(
            self.crash_reason()
            + f"\ndeploy it again to start a fresh worker (`llm-nb deploy {self.spec.name} {self.spec.path}`)",
            exit=describe_exit(self.returncode),
        )

    async def predict(self, payload: Any, timeout: float | None) -> Any:
        return (await self._json("POST", "/predict", {"payload": payload}, timeout=timeout))["result"]

    async def restore(self, timeout: float) -> None:
        await self._json("POST", "/restore", timeout=timeout)


@dataclass
class Deployment:
    name: str
    folder: Path
    version: int
    model_json: dict
    engine: str = "local"  # or "ray"
    #: engine="ray": replicas, autoscaling, ray_actor_options, wait_for_resources (as deploy() got them)
    engine_options: dict = field(default_factory=dict)
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
    copy_job: CopyJob | None = None
    #: Set, with the error its deploy answers, by an undeploy or the host stopping.
    cancel_error: LlmNbError | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # the deploy ended, one way or another

    @property
    def lease_client(self) -> str:
        return f"deployment:{self.name}@{self.instance[:8]}"

    def replicas(self) -> dict:
        if self.engine == "ray":
            target = self.engine_options.get("replicas", 1) if not self.engine_options.get("autoscaling") else None
            return self.info.get("replicas") or {"target": target, "running": 0}
        return {"target": 1, "running": 1 if self.state == "ready" else 0}

    def memory(self) -> int | None:
        """What the deployment holds: its worker, or on Ray its replicas where the head is local (else unknown)."""
        if self.engine == "ray":
            return self.info.get("replicas_rss_bytes")
        return memory.process_rss(self.worker.pid) if self.worker and self.worker.pid else 0

    def meta(self, base_url: str) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "engine": self.engine,
            "replicas": self.replicas(),
            # While a Ray deploy runs, the driver's last word (why replicas wait); then the application's.
            "ray": (self.info.get("ray") or self.progress.get("ray")) if self.engine == "ray" else None,
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
            "rss_bytes": self.memory(),
            "deploy_seconds": self.deploy_seconds,
            "bytes_copied": self.copy_job.bytes_done if self.copy_job else 0,
            "bytes_total": self.copy_job.total if self.copy_job else None,
            "progress": self.progress,
            "failure": self.failure,
            "api_url": f"{base_url}/models/{self.name}/",
            "log_file": str(self.worker.log_path) if self.worker else None,
        }


#: What a session token sees of a deployment (status, listing, get_meta): no folder, files,
#: model.json, pids, log, failure text or cluster address; those are for the host key's holder.
SCOPED_FIELDS = (
    "name",
    "version",
    "engine",
    "replicas",
    "state",
    "created",
    "requests_served",
    "errors",
    "in_flight",
    "waiting",
    "max_concurrency",
    "rss_bytes",
)


def scoped_meta(meta: dict) -> dict:
    scoped = {k: meta.get(k) for k in SCOPED_FIELDS}
    ray = meta.get("ray")
    scoped["ray"] = {k: ray.get(k) for k in ("status", "replica_states")} if ray else None
    return scoped


class LiveDeployments:
    """The deployment versions whose workers run or are starting, by credential id.

    Made before the registry and the token issuer, which ask it what those workers
    hold (their memory shares the models' budget) and whether a deployment's
    credential still stands; the manager adds and removes versions.
    """

    def __init__(self) -> None:
        self._by_instance: dict[str, Deployment] = {}

    def add(self, dep: Deployment) -> None:
        self._by_instance[dep.instance] = dep

    def remove(self, dep: Deployment) -> None:
        self._by_instance.pop(dep.instance, None)

    def get(self, instance: str) -> Deployment | None:
        return self._by_instance.get(instance)

    def is_live(self, instance: str) -> bool:
        return instance in self._by_instance

    def memory_costs(self, kind: str) -> dict[str, int]:
        """What each live deployment worker holds now (RSS, or GPU bytes under a GPU budget).

        Its weights count against the models' budget like a model's would; models it leases
        through ``use_model`` are counted once, as those models.
        """
        costs: dict[str, int] = {}
        if not self._by_instance:
            return costs
        gpu_by_pid = memory.gpu_memory_by_pid() if kind == "gpu" else {}
        for dep in list(self._by_instance.values()):
            pid = dep.worker.pid if dep.worker and dep.worker.returncode is None else None
            if pid:
                measured = memory.measure(pid, gpu_by_pid)
                cost = measured["gpu_bytes" if kind == "gpu" else "rss_bytes"]
                if kind != "gpu":  # replicas on a local Ray head use this machine's memory too
                    cost += dep.info.get("replicas_rss_bytes") or 0
                costs[f"deployment {dep.name} v{dep.version}"] = cost
        return costs
