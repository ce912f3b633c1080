"""Loaded models, their leases, the memory budget and keep-alive.

The registry is the host's single source of truth: who holds what, what it
costs, what state it is in. A load belongs to the registry, not to the request
that asked for it: a client that gives up does not abort a load that others
wait on (ollama#7408). Each model's own record (its runner, leases, costs,
status) is a ``loaded.LoadedModel``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..catalog import ModelSpec, catalog_spec
from ..config import Settings, format_bytes
from ..connection import pid_alive
from ..errors import (
    InsufficientMemory,
    InvalidModelFile,
    InvalidRequest,
    ModelCrashed,
    ModelFailed,
    ModelLoading,
    ModelNotFound,
)
from ..model_files import gguf_problem
from . import memory
from .crashes import CrashMemory
from .loaded import Lease, LoadedModel, Runner
from .remote import RemoteEngine
from .scheduler import ModelQueue
from .vllm import VllmEngine
from .vllm_env import checked_spec
from .workers import WatchedProcess, WorkerProcess, safe_name

log = logging.getLogger("llm_nb.host.registry")


def _same_model(a: ModelSpec, b: ModelSpec) -> bool:
    return (a.backend, a.path, a.url, a.remote_model) == (b.backend, b.path, b.url, b.remote_model)


class Registry:
    def __init__(
        self, settings: Settings, runtime_dir: Path, other_costs: Callable[[str], dict[str, int]] | None = None
    ):
        self.settings = settings
        self.runtime_dir = runtime_dir
        self.log_dir = runtime_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if settings.memory_budget:
            self.budget_bytes = settings.memory_budget
            self.budget_kind = "gpu" if memory.gpu_info() else "ram"
        else:
            self.budget_bytes, self.budget_kind = memory.default_budget()
        self.models: dict[str, LoadedModel] = {}
        #: Memory outside the models that shares their budget, measured now: the deployments'
        #: workers (``{"deployment NAME v1": bytes}``).
        self.other_costs: Callable[[str], dict[str, int]] = other_costs or (lambda kind: {})
        self.version = 0
        self._changed = asyncio.Condition()
        self._admit = asyncio.Lock()
        self._reaper: asyncio.Task | None = None
        self._worker_seq = 0
        self._crashes = CrashMemory()
        #: Hub mode: checks a user's load against their share (``users.Shares.check``), and says
        #: who holds a model without naming other users.
        self.admission: Callable[[Lease | None, LoadedModel | None, int, str], None] | None = None
        self.describe_holders: Callable[[LoadedModel], str] = lambda m: (
            ", ".join(lease.name for lease in m.leases.values()) or "nobody"
        )

    # --- change notification (the panel's event stream) ---------------------
    def notify(self) -> None:
        self.version += 1

        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(wake())

    async def wait_change(self, since: int, timeout: float) -> int:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version != since), timeout)
            except TimeoutError:
                pass
        return self.version

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever())

    async def shutdown(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        await asyncio.gather(*(self._free(m) for m in list(self.models.values())), return_exceptions=True)

    # --- budget --------------------------------------------------------------
    def used_bytes(self, others: dict[str, int] | None = None) -> int:
        """Models plus the other costs (``others``: as ``other_costs`` measured them a moment ago)."""
        if others is None:
            others = self.other_costs(self.budget_kind)
        return sum(m.cost_bytes(self.budget_kind) for m in self.models.values()) + sum(others.values())

    def holders_summary(self) -> str:
        parts = []
        for m in self.models.values():
            holders = self.describe_holders(m)
            parts.append(
                f"{m.spec.name} ({format_bytes(m.cost_bytes(self.budget_kind))}, {m.display_state}) held by {holders}"
            )
        parts += [f"{label} ({format_bytes(cost)})" for label, cost in self.other_costs(self.budget_kind).items()]
        return "; ".join(parts) or "no models loaded"

    async def _make_room(self, need: int, name: str) -> None:
        """Evict unheld, quiet models, least recently used first, until ``need`` fits."""
        free = self.budget_bytes - self.used_bytes()
        if need <= free:
            return
        candidates = sorted(
            (
                m
                for m in self.models.values()
                if not m.leases
                and m.queue.in_flight == 0
                and m.state == "ready"
                and m.keep_alive >= 0
                and m.spec.backend != "remote"
            ),
            key=lambda m: m.last_used,
        )
        reclaimable = sum(m.cost_bytes(self.budget_kind) for m in candidates)
        if need > free + reclaimable:
            raise InsufficientMemory(
                f"loading {name!r} needs about {format_bytes(need)} but only {format_bytes(free)} of the "
                f"{format_bytes(self.budget_bytes)} {self.budget_kind.upper()} budget is free"
                + (f" ({format_bytes(reclaimable)} more could be freed by evicting idle models)" if reclaimable else "")
                + f". Loaded: {self.holders_summary()}. Unload a model (`%llm_unload NAME`, `llm-nb unload NAME`), "
                "or raise the budget with LLM_NB_MEMORY_BUDGET.",
                needed_bytes=need,
                free_bytes=free,
                budget_bytes=self.budget_bytes,
            )
        for victim in candidates:
            if need <= self.budget_bytes - self.used_bytes():
                break
            log.info("evicting %s (idle since %s) to make room for %s", victim.spec.name, victim.idle_since, name)
            await self._free(victim)

    # --- load / unload ---------------------------------------------------------
    async def load(
        self, spec: ModelSpec, lease: Lease | None, keep_alive: float | None = None, api_key: str | None = None
    ) -> tuple[LoadedModel, bool]:
        """Attach to ``spec.name`` if it is loaded (or loading), else load it. Returns (model, attached).

        Without a lease (a load on first use) the model is held by nobody and lives by keep-alive.
        """
        async with self._admit:
            model = self.models.get(spec.name)
            if model is None or model.state in ("failed", "unloading"):
                self._crashes.refuse(spec)
            carried: dict[str, Lease] = {}
            if model is not None and model.state in ("failed", "unloading"):
                carried = model.leases if model.state == "failed" else {}
                await self._free(model)
                model = None
            if model is not None:
                if not _same_model(model.spec, spec):
                    raise InvalidRequest(
                        f"the name {spec.name!r} is taken by {model.spec.path or model.spec.url} ({model.spec.backend}); "
                        "choose another with --name"
                    )
                if self.admission is not None:
                    self.admission(lease, model, model.cost_bytes(self.budget_kind), spec.name)
                if lease is not None:
                    model.leases[lease.client] = lease
                    model.idle_since = None
                if keep_alive is not None:
                    model.keep_alive = keep_alive
                model.touch()
                attached = True
            else:
                if spec.backend == "vllm":  # a 400 that says how to install it, or names an option, before any eviction
                    spec = checked_spec(spec)
                need = await asyncio.to_thread(memory.estimate, spec)
                if self.admission is not None:
                    self.admission(lease, None, need, spec.name)
                await self._make_room(need, spec.name)
                model = LoadedModel(
                    spec,
                    self.settings.keep_alive if keep_alive is None else keep_alive,
                    need,
                    self.settings.max_queue,
                )
                model.leases = {**carried, **({lease.client: lease} if lease else {})}
                self.models[spec.name] = model
                model.load_task = asyncio.create_task(self._run_load(model, api_key))
                attached = False
            self.notify()
        await asyncio.shield(model.load_task)
        return model, attached

    def _new_runner(self, spec: ModelSpec, api_key: str | None) -> Runner:
        """A remote engine for a remote model, a vLLM server for vLLM, else a worker process of its own."""
        if spec.backend == "remote":
            return RemoteEngine(spec, api_key)
        log_path = self.log_dir / f"{safe_name(spec.name)}.log"
        if spec.backend == "vllm":
            return VllmEngine(spec, log_path, on_exit=self._worker_exited)
        self._worker_seq += 1  # short socket names: a Unix socket path must fit in 107 bytes
        socket_path = self.runtime_dir / f"w{self._worker_seq}.sock"
        return WorkerProcess(spec, socket_path, log_path, on_exit=self._worker_exited)

    async def _run_load(self, model: LoadedModel, api_key: str | None = None) -> None:
        started = time.monotonic()

        def on_progress(event: dict) -> None:
            model.progress = {k: event.get(k) for k in ("message", "fraction", "elapsed")}
            self.notify()

        try:
            model.runner = self._new_runner(model.spec, api_key)
            model.info = await model.runner.open(on_progress)
            model.queue = ModelQueue(model.spec.name, int(model.info.get("parallel", 1)), self.settings.max_queue)
        except BaseException as exc:
            log.warning("load of %s failed: %s", model.spec.name, exc)
            if model.runner is not None:
                await model.runner.kill()
            if self.models.get(model.spec.name) is model:
                del self.models[model.spec.name]
            self.notify()
            if isinstance(exc, ModelFailed) and (problem := await self._file_problem(model.spec)):
                raise InvalidModelFile(f"the model path {model.spec.path} {problem}") from exc
            raise
        model.load_seconds = time.monotonic() - started
        model.loaded_at = time.time()
        model.state = "ready"
        model.progress = {}
        await self._measure(model)
        log.info(
            "loaded %s in %.2f s (%s)",
            model.spec.name,
            model.load_seconds,
            format_bytes(model.cost_bytes(self.budget_kind)),
        )
        self.notify()

    @staticmethod
    async def _file_problem(spec: ModelSpec) -> str | None:
        """Why a model file failed to load, when it is the file's fault (a bad request, not a host fault)."""
        if not spec.path or not str(spec.path).lower().endswith(".gguf"):
            return None
        return await asyncio.to_thread(gguf_problem, spec.path)

    async def _worker_exited(self, worker: WatchedProcess) -> None:
        if worker.stopping:
            return
        self._crashes.remember(worker)
        for model in self.models.values():
            if model.runner is worker and model.state != "unloading":
                model.state = "failed"
                model.failure = worker.crash_reason()
                model.measured = {"rss_bytes": 0, "gpu_bytes": 0}
                self.notify()

    async def unload(self, name: str, client: str | None, force: bool = False) -> dict:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded; loaded: {', '.join(self.models) or 'none'}")
        if force:
            holders = [lease.name for lease in model.leases.values()]
            await self._free(model)
            return {"name": name, "unloaded": True, "released": holders}
        released = model.leases.pop(client, None) if client else None
        if not model.leases:
            model.idle_since = model.idle_since or time.time()
        freed = await self._expire(model)
        self.notify()
        return {
            "name": name,
            "unloaded": freed,
            "released": [released.name] if released else [],
            "remaining_leases": len(model.leases),
            "expires_at": model.expires_at(),
        }

    async def release(self, gone: Callable[[Lease], bool], why: str) -> int:
        """End every lease ``gone`` picks (``why``: for the log); returns how many ended."""
        released = 0
        for model in list(self.models.values()):
            ended = [client for client, lease in model.leases.items() if gone(lease)]
            for client in ended:
                log.info("releasing %s's lease on %s: %s", model.leases[client].name, model.spec.name, why)
                del model.leases[client]
            released += len(ended)
            if ended and not model.leases:  # this model's last lease ended here: its keep-alive starts
                model.idle_since = model.idle_since or time.time()
                await self._expire(model)
        if released:
            self.notify()
        return released

    async def _expire(self, model: LoadedModel, now: float | None = None) -> bool:
        """Free a model whose keep-alive has run out (or that failed and nobody holds)."""
        if model.leases or model.queue.in_flight:
            return False
        if model.state == "failed":
            await self._free(model)
            return True
        expires = model.expires_at()
        if model.state == "ready" and expires is not None and expires <= (now or time.time()):
            await self._free(model)
            return True
        return False

    async def _free(self, model: LoadedModel) -> None:
        name = model.spec.name
        if model.state == "loading" and model.load_task and not model.load_task.done():
            if model.runner is not None:
                await model.runner.kill()
            model.load_task.cancel()
        model.state = "unloading"
        self.notify()
        try:
            if model.runner is not None:
                await model.runner.stop(self.settings.worker_grace)
        finally:
            if self.models.get(name) is model:
                del self.models[name]
            self.notify()
            memory.release_free_memory()
            log.info("unloaded %s", name)

    # --- requests ----------------------------------------------------------------
    async def for_request(self, name: str | None, may_load: bool = True) -> LoadedModel:
        """``get``, after loading a catalog model a request names on its first use (as Ollama does).

        A model that is loading is waited for, so concurrent first requests share one load.
        Only catalog names load this way, never a path a request names. ``may_load``: False
        for llm-nb's own clients (``LOAD_ON_REQUEST_HEADER``).
        """
        if name and may_load and self.settings.load_on_request:
            model = self.models.get(name)
            if model is None:
                spec = await asyncio.to_thread(catalog_spec, name, self.settings.catalog_file)
                if spec is not None:
                    _, attached = await self.load(spec, None)  # concurrent first requests attach to one load
                    if not attached:
                        log.info("loaded %s on its first request; it is held by nobody", name)
            elif model.state == "loading" and model.load_task is not None:
                await asyncio.shield(model.load_task)
        return self.get(name)

    def get(self, name: str | None) -> LoadedModel:
        """The model a request names, ready to serve, or an error that says what to do."""
        if not name:
            raise InvalidRequest(
                'the request names no model; set "model" to one of: ' + (", ".join(self.models) or "(none loaded)")
            )
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(
                f"model {name!r} is not loaded; loaded: {', '.join(self.models) or 'none'}. "
                f"Load it first (`%llm_load {name}`, `llm-nb load {name}`, or POST /api/models/load)"
            )
        if model.state == "loading":
            raise ModelLoading(f"model {name!r} is still loading; retry in a few seconds", retry_after=2)
        if model.state == "failed":
            raise ModelCrashed(f"model {name!r} failed: {model.failure}\nload it again to start a fresh worker")
        if model.state == "unloading":
            raise ModelNotFound(f"model {name!r} is being unloaded")
        return model

    # --- housekeeping ----------------------------------------------------------
    async def _measure(self, model: LoadedModel, gpu_by_pid: dict[int, int] | None = None) -> None:
        if model.runner is not None and model.runner.pid:
            measured = await asyncio.to_thread(memory.measure, model.runner.pid, gpu_by_pid)
            # NVML cannot see pids inside a container: then count what the worker's own
            # CUDA allocator reported (the transformers backend's info()["gpu_bytes"]).
            if not measured["gpu_bytes"] and model.info.get("gpu_bytes"):
                measured["gpu_bytes"] = int(model.info["gpu_bytes"])
            model.measured = measured

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_check_interval)
            try:
                await self.reap()
            except Exception:  # housekeeping must never stop
                log.exception("housekeeping failed")

    async def reap(self) -> None:
        """Release leases of clients that ended, expire idle models, refresh measurements."""
        now = time.time()
        changed = False
        for model in list(self.models.values()):
            for client, lease in list(model.leases.items()):
                if lease.watchable() and not pid_alive(lease.pid, lease.pid_started):
                    log.info(
                        "client %s (pid %s) is gone: releasing its lease on %s", lease.name, lease.pid, model.spec.name
                    )
                    del model.leases[client]
                    changed = True
                    if not model.leases:
                        model.idle_since = now
            if model.leases:
                model.idle_since = None
            elif model.idle_since is None:
                model.idle_since = now
            if await self._expire(model, now):
                changed = True
        gpu_by_pid = await asyncio.to_thread(memory.gpu_memory_by_pid) if self.budget_kind == "gpu" else {}
        for model in list(self.models.values()):
            if model.state == "ready":
                await self._measure(model, gpu_by_pid)
            # The cache's figures come with each finished request; panels hear of them here, at
            # most once a check, not once a request.
            if model.info.get("prompt_cache") != model.cache_shown:
                model.cache_shown = model.info.get("prompt_cache")
                changed = True
            if model.state == "ready" and model.runner is not None and await model.runner.refresh_health():
                model.info = await model.runner.info()
                changed = True
        if changed:
            self.notify()

    def status_json(self) -> dict:
        others = self.other_costs(self.budget_kind)  # measured now: once per status
        return {
            "models": [m.status_json(self.budget_kind) for m in self.models.values()],
            "budget_bytes": self.budget_bytes,
            "budget_kind": self.budget_kind,
            "used_bytes": self.used_bytes(others),
            "other_bytes": others,
            "version": self.version,
        }
