"""The host process: one aiohttp app on 127.0.0.1, its connection file, its workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from .._version import __version__
from ..config import Settings, host_log_level, parse_duration, parse_size
from ..connection import connection_path, live_host, pid_alive, remove_if_ours, write_connection
from . import admin_api, kserve_api, memory, openai_api, openapi
from .deployments import DeploymentManager, LiveDeployments, stop_all
from .deployments import routes as deployment_routes
from .http import error_middleware, make_auth_middleware
from .registry import Registry
from .tokens import TokenIssuer
from .tokens import routes as token_routes

log = logging.getLogger("llm_nb.host")
SHUTDOWN_GRACE_S = 10.0


def create_app(settings: Settings, key: str, runtime: Path, info: dict) -> web.Application:
    """The host's app; its registry (``app["registry"]``) is started and stopped by ``serve``."""
    # The deployments' workers share the models' memory budget, and their credentials hold
    # while they run: the registry and the token issuer ask the live deployments.
    live = LiveDeployments()
    tokens = TokenIssuer(deployment_alive=live.is_live)
    registry = Registry(settings, runtime, other_costs=live.memory_costs)
    app = web.Application(
        middlewares=[error_middleware, make_auth_middleware(key, tokens.verify)],
        client_max_size=settings.max_body_bytes,
    )
    app["settings"] = settings
    app["registry"] = registry
    app["info"] = info
    app["stop_event"] = asyncio.Event()
    app["tokens"] = tokens
    app["deployments"] = DeploymentManager(settings, registry, tokens, info["url"], live)
    app.on_cleanup.append(stop_all)
    app.add_routes(admin_api.routes)
    app.add_routes(openai_api.routes)
    app.add_routes(token_routes)
    app.add_routes(deployment_routes)
    app.add_routes(openapi.routes)
    app.add_routes(kserve_api.routes)
    return app


def _runtime_folder(conn_file: Path) -> Path:
    """A 0700 folder for worker sockets and logs; short, as socket paths must be."""
    folder = conn_file.parent / f"llm-nb-{os.getpid()}"
    if len(str(folder)) > 80:
        return Path(tempfile.mkdtemp(prefix=f"llm-nb-{os.getpid()}-"))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def _clean_stale_folders(parent: Path) -> None:
    """Folders of hosts that died without cleaning up (kill -9): their sockets are dead."""
    for folder in parent.glob("llm-nb-*"):
        try:
            pid = int(folder.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if folder.is_dir() and not pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


async def serve(settings: Settings, parent_pid: int | None = None) -> int:
    memory.limit_malloc_arenas()
    conn_file = connection_path(settings.connection_file)
    existing = live_host(conn_file)
    if existing is not None:
        log.error("a host already runs at %s (pid %s); stop it with `llm-nb stop`", existing["url"], existing["pid"])
        return 1
    _clean_stale_folders(conn_file.parent)
    runtime = _runtime_folder(conn_file)
    file_handler = logging.FileHandler(runtime / "host.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("llm_nb").addHandler(file_handler)

    key = secrets.token_urlsafe(32)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", settings.port))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    info = {
        "url": url,
        "key": key,
        "pid": os.getpid(),
        "version": __version__,
        "started": time.time(),
        "runtime_dir": str(runtime),
    }
    app = create_app(settings, key, runtime, info)
    registry: Registry = app["registry"]
    # handler_cancellation: a client that goes away cancels its request, and so its generation.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    registry.start()
    write_connection(conn_file, info)
    log.info("llm-nb host %s listening on %s (connection file %s)", __version__, url, conn_file)

    stop = app["stop_event"]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent_watch = asyncio.create_task(_stop_with_parent(parent_pid, stop)) if parent_pid else None
    try:
        await stop.wait()
    finally:
        if parent_watch is not None:
            parent_watch.cancel()
        log.info("stopping: letting requests in flight finish (up to %.0f s)", SHUTDOWN_GRACE_S)
        remove_if_ours(conn_file, os.getpid())  # new clients must not find a host that is going
        await runner.cleanup()  # stops listening, waits for handlers, then cancels the rest
        await registry.shutdown()
        _remove_sockets(runtime)
        log.info("stopped")
    return 0


async def _stop_with_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Stop (and free every worker) when the process that started us is gone, even after a kill -9."""
    import psutil

    try:
        parent = psutil.Process(parent_pid)
        # is_running() compares start times too, so a reused pid does not keep us alive.
        while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
            await asyncio.sleep(1.0)
    except psutil.Error:
        pass
    log.warning("the process that started this host (pid %s) is gone; stopping", parent_pid)
    stop.set()


def _remove_sockets(runtime: Path) -> None:
    for sock in runtime.glob("*.sock"):
        sock.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-nb host", description="Run the shared model host in the foreground.")
    add_host_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_host_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument(
        "--connection-file", help="where to write the connection file (default: $LLM_NB_CONNECTION or the per-user one)"
    )
    parser.add_argument("--memory-budget", help="e.g. 6GiB (default: 90%% of GPU memory, else 50%% of RAM)")
    parser.add_argument("--keep-alive", help="seconds an unheld model stays loaded (default 300; -1 forever)")
    parser.add_argument("--log-level", default=host_log_level())
    parser.add_argument(
        "--parent-pid", type=int, help="stop when this process ends (the Jupyter server that supervises the host)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    settings = Settings.from_env()
    if args.port is not None:
        settings.port = args.port
    if args.connection_file:
        settings.connection_file = Path(args.connection_file)
    if args.memory_budget:
        settings.memory_budget = parse_size(args.memory_budget)
    if args.keep_alive is not None:
        settings.keep_alive = parse_duration(args.keep_alive)
    return asyncio.run(serve(settings, parent_pid=getattr(args, "parent_pid", None)))
