"""The Jupyter server extension: one model host per Jupyter server.

It starts the host on first need (a kernel of this server starting, or the
panel loading a model) or at server start-up, supervises it, stops it with
the server, and puts ``LLM_NB_CONNECTION`` into the server's environment so
that every kernel (and terminal) the server launches finds that one host.

Configure it like any Jupyter app, e.g. in ``jupyter_server_config.py``::

    c.LlmNbExtension.memory_budget = "6GiB"
    c.LlmNbExtension.keep_alive = "10m"
    c.LlmNbExtension.start_policy = "startup"

Each setting's default comes from its ``LLM_NB_*`` environment variable.

Under a JupyterHub whose ``llm-nb hub-service`` runs one host for every user
(``LLM_NB_HUB_URL`` in the server's environment), the server starts no host:
it uses the Hub's, with the user's own Hub API token (``hub_link``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aiohttp
import psutil
from jupyter_server.extension.application import ExtensionApp
from traitlets import Dict, Enum, Float, Int, TraitError, Unicode, default, validate

from .._version import __version__
from ..config import parse_duration, parse_size, setting_text
from ..connection import CONNECTION_ENV
from ..errors import LlmNbError
from ..locator import hub_locator
from .events import StatusHub
from .handlers import route_table
from .hub_link import HubServiceLink
from .supervisor import HostSupervisor

KERNEL_ACTIONS_SCHEMA = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"


class LlmNbExtension(ExtensionApp):
    """Serves ``/llm-nb/api/*`` and owns this server's model host."""

    name = "llm_nb"
    description = "One shared model host per Jupyter server, and the REST API of its JupyterLab panel."

    start_policy = Enum(
        ["lazy", "startup"],
        help="""When to start the model host. "lazy": when the first kernel of this server starts,
        or when the LLM panel first loads a model or chats; "startup": as soon as the server starts.
        Default: $LLM_NB_START_POLICY, else "lazy".""",
    ).tag(config=True)

    memory_budget = Unicode(
        help="""Memory the host's models may use together, e.g. "6GiB" or "512MB" (an empty string:
        90 % of GPU memory where CUDA is available, else 50 % of RAM). Unheld models are evicted,
        least recently used first, to make room. Default: $LLM_NB_MEMORY_BUDGET.""",
    ).tag(config=True)

    keep_alive = Unicode(
        help="""How long a model that nobody holds stays loaded: seconds, or "5m", "1h";
        "0" frees it at once, "-1" keeps it forever. Default: $LLM_NB_KEEP_ALIVE, else 300 s.""",
    ).tag(config=True)

    connection_file = Unicode(
        help="""Where the host writes its connection file (url, key). Default: a file named for
        this server's pid in the Jupyter runtime dir, so that each server has its own host.""",
    ).tag(config=True)

    host_start_timeout = Float(
        60.0, help="Seconds to wait for the host to answer after starting it before reporting a failure."
    ).tag(config=True)

    max_restarts = Int(
        5, help="Crashes within five minutes after which the host is no longer restarted automatically."
    ).tag(config=True)

    ray_address = Unicode(
        help="""The Ray cluster that engine="ray" deployments run on ("HOST:PORT" or "ray://HOST:10001").
        Empty: the host starts a local Ray head of its own on the first Ray deploy, and stops it with
        itself. Default: $LLM_NB_RAY_ADDRESS, else $RAY_ADDRESS.""",
    ).tag(config=True)

    host_env = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help="""Extra environment variables for the host and its model workers,
        e.g. {"CUDA_VISIBLE_DEVICES": "0"}.""",
    ).tag(config=True)

    @default("start_policy")
    def _start_policy_default(self) -> str:
        return setting_text("START_POLICY", "lazy")

    @default("memory_budget")
    def _memory_budget_default(self) -> str:
        return setting_text("MEMORY_BUDGET")

    @default("keep_alive")
    def _keep_alive_default(self) -> str:
        return setting_text("KEEP_ALIVE")

    @default("ray_address")
    def _ray_address_default(self) -> str:
        return setting_text("RAY_ADDRESS") or os.environ.get("RAY_ADDRESS", "")

    @validate("memory_budget", "keep_alive")
    def _check_size_or_duration(self, proposal) -> str:
        name, value = proposal["trait"].name, proposal["value"].strip()
        if value:
            try:
                (parse_size if name == "memory_budget" else parse_duration)(value)
            except LlmNbError as exc:
                raise TraitError(f"LlmNbExtension.{name}: {exc}") from None
        return value

    # --- set-up ------------------------------------------------------------------
    def initialize_settings(self) -> None:
        runtime = Path(self.serverapp.runtime_dir)
        self.hub = StatusHub(self.snapshot)
        self._http: aiohttp.ClientSession | None = None
        self.panel_identity = {
            "id": f"jupyter-panel:{os.getpid()}",
            "name": "LLM panel (JupyterLab)",
            "pid": os.getpid(),
            "pid_started": psutil.Process().create_time(),
            "hostname": socket.gethostname(),
        }
        shared = hub_locator()
        if shared is not None:
            self.panel_identity["server"] = os.environ.get("JUPYTERHUB_SERVER_NAME", "")
            self.supervisor = HubServiceLink(
                shared.url, shared.token, runtime, on_change=self.hub.publish, log=self.log
            )
            self.start_policy = "startup"  # nothing to start: following the shared host costs one connection
            self.hub.publish()
            self.log.info(
                "llm-nb %s: this server uses the JupyterHub's shared model host at %s", __version__, shared.url
            )
            return
        conn = Path(self.connection_file).expanduser() if self.connection_file else None
        conn = conn or runtime / f"llm-nb-host-{os.getpid()}.json"
        inherited = os.environ.get(CONNECTION_ENV)
        if inherited and Path(inherited) != conn:
            self.log.info("llm-nb: this server's kernels use %s instead of the inherited %s", conn, inherited)
        # Kernels and terminals get a copy of the server's environment (jupyter_server's
        # session manager and jupyter_client's launcher both start from os.environ), so this
        # one assignment reaches every kernel the server launches, restarts included.
        os.environ[CONNECTION_ENV] = str(conn)

        host_args: list[str] = []
        if self.memory_budget:
            host_args += ["--memory-budget", self.memory_budget]
        if self.keep_alive:
            host_args += ["--keep-alive", self.keep_alive]
        env = {**os.environ, **self.host_env} if self.host_env else None
        if self.ray_address:
            env = {**(env or os.environ), "LLM_NB_RAY_ADDRESS": self.ray_address}
        self.supervisor = HostSupervisor(
            conn,
            host_args=host_args,
            env=env,
            start_timeout=self.host_start_timeout,
            max_restarts=self.max_restarts,
            on_change=self.hub.publish,
            log=self.log,
        )
        self.hub.publish()
        if self.start_policy == "lazy":
            self.serverapp.event_logger.add_listener(schema_id=KERNEL_ACTIONS_SCHEMA, listener=self._on_kernel_action)
        self.log.info("llm-nb %s: model host for this server at %s (start: %s)", __version__, conn, self.start_policy)

    def initialize_handlers(self) -> None:
        self.handlers.extend(route_table())

    async def _start_jupyter_server_extension(self, serverapp) -> None:  # noqa: ANN001 - jupyter_server's hook
        if self.start_policy == "startup":
            asyncio.ensure_future(self._start_quietly("server start-up"))

    async def _on_kernel_action(self, logger, schema_id: str, data: dict) -> None:  # noqa: ANN001
        if data.get("action") == "start" and data.get("status") == "success":
            await self._start_quietly(f"kernel {data.get('kernel_id', '?')} started")

    async def _start_quietly(self, reason: str) -> None:
        """Start the host for ``reason``; a failure is logged and shown in the panel, never raised."""
        if self.supervisor.state in ("running", "starting", "restarting", "failed"):
            return  # a failed host waits for someone to act on the panel's message
        try:
            await self.supervisor.ensure_started()
        except LlmNbError as exc:
            self.log.error("llm-nb: could not start the model host (%s): %s", reason, exc)

    def http(self) -> aiohttp.ClientSession:
        """One connection pool to the host, made inside the server's loop."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._http

    def display_name(self, holder: str) -> str:
        """A holder as the file browser shows it: a notebook's path relative to the server's root."""
        if os.path.isabs(holder):
            root = Path(self.serverapp.root_dir).expanduser()
            for base in (root, root.resolve()):
                try:
                    return str(Path(holder).relative_to(base))
                except ValueError:
                    continue
        return holder

    def snapshot(self) -> dict:
        """What the panel shows: the host process, its models and deployments, the budget (no key, no URL)."""
        status = self.supervisor.status or {}
        models = [
            dict(m, leases=[dict(lease, display=self.display_name(lease["name"])) for lease in m.get("leases", [])])
            for m in status.get("models", [])
        ]
        return {
            "server": {"version": __version__, "start_policy": self.start_policy},
            "host": self.supervisor.describe(),
            "models": models,
            "deployments": status.get("deployments", []),
            "budget_bytes": status.get("budget_bytes"),
            "budget_kind": status.get("budget_kind"),
            "used_bytes": status.get("used_bytes"),
            # Hub mode: who this user is to the shared host, and their share of its budget.
            "user": status.get("user"),
            "share": status.get("share"),
        }

    async def stop_extension(self) -> None:
        if self.start_policy == "lazy":
            self.serverapp.event_logger.remove_listener(
                schema_id=KERNEL_ACTIONS_SCHEMA, listener=self._on_kernel_action
            )
        await self.hub.close()
        await self.supervisor.stop()
        if self._http is not None:
            await self._http.close()
        self.log.info("llm-nb: model host stopped")
