"""The host process: one aiohttp app on 127.0.0.1, its connection file, its workers."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiohttp import web

from .._version import __version__
from ..config import Settings, host_log_level, parse_duration, parse_size
from ..connection import connection_path, live_host, pid_alive, remove_if_ours, write_connection
from . import admin_api, kserve_api, memory, openai_api, openapi, responses_api
from .deployments import DeploymentManager, LiveDeployments, stop_all
from .deployments import routes as deployment_routes
from .http import error_middleware, make_auth_middleware, make_connection_limit
from .registry import Registry
from .tokens import TokenIssuer
from .tokens import routes as token_routes

log = logging.getLogger("llm_nb.host")
# A stop (SIGTERM, SIGINT, `llm-nb stop`, the parent gone) lets requests in flight finish for
# SHUTDOWN_GRACE_S, cancels what is left, and the process is gone within STOP_BOUND_S whatever
# is in flight: past the bound it is ended (see _HardStop).
SHUTDOWN_GRACE_S = 6.0
LINGER_S = 0.5
STOP_BOUND_S = 10.0
STOP_MARGIN_S = 2.0  # the orderly stop aims to be done this long before the bound


def create_app(settings: Settings, key: str, runtime: Path, info: dict, hub: bool = False) -> web.Application:
    """The host's app; its registry (``app["registry"]``) is started and stopped by ``serve``.

    ``hub``: serve every user of a JupyterHub (``hub.HubMode``): users from their Hub tokens.
    """
    # The deployments' workers share the models' memory budget, and their credentials hold
    # while they run: the registry and the token issuer ask the live deployments.
    live = LiveDeployments()
    tokens = TokenIssuer(deployment_alive=live.is_live)
    registry = Registry(settings, runtime, other_costs=live.memory_costs)
    hub_mode = None
    if hub:
        from .hub import HubMode

        hub_mode = HubMode(registry)
    app = web.Application(
        middlewares=[
            error_middleware,
            make_connection_limit(settings.max_connections),
            make_auth_middleware(key, tokens.verify, hub_mode.verify if hub_mode else None),
        ],
        client_max_size=settings.max_body_bytes,
    )
    app["hub"] = hub_mode
    if hub_mode is not None:
        app.on_startup.append(hub_mode.start)
        app.on_cleanup.append(hub_mode.stop)
    app["settings"] = settings
    app["registry"] = registry
    app["info"] = info
    app["stop_event"] = asyncio.Event()
    app["tokens"] = tokens
    app["deployments"] = DeploymentManager(settings, registry, tokens, info["url"], live)
    app.on_cleanup.append(stop_all)
    app.add_routes(admin_api.routes)
    app.add_routes(openai_api.routes)
    app.add_routes(responses_api.routes)
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


async def serve(settings: Settings, parent_pid: int | None = None, hub: bool = False, bind: str = "127.0.0.1") -> int:
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
    sock.bind((bind, settings.port))
    port = sock.getsockname()[1]
    url = f"http://{'127.0.0.1' if bind in ('0.0.0.0', '') else bind}:{port}"
    info = {
        "url": url,
        "key": key,
        "pid": os.getpid(),
        "version": __version__,
        "started": time.time(),
        "runtime_dir": str(runtime),
        "hub": hub,
    }
    app = create_app(settings, key, runtime, info, hub=hub)
    registry: Registry = app["registry"]
    # handler_cancellation: a client that goes away cancels its request, and so its generation.
    # keepalive_timeout also bounds a connection that has not sent a whole request yet (aiohttp
    # closes it if its handler is still waiting): idle sockets and slow headers both end.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        # At a stop aiohttp waits this long for handlers, as long again after telling them to
        # stop, and only then cancels them: half the grace each.
        shutdown_timeout=SHUTDOWN_GRACE_S / 2,
        access_log=None,
        keepalive_timeout=settings.idle_timeout,
        # After an answer that did not read the whole body (a 401 before an upload), read and drop
        # the rest only this long, so the client sees the answer before the connection closes.
        lingering_time=LINGER_S,
    )
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    registry.start()
    write_connection(conn_file, info)
    log.info("llm-nb host %s listening on %s (connection file %s)", __version__, url, conn_file)

    stop = app["stop_event"]
    loop = asyncio.get_running_loop()
    hard_stop = _HardStop(conn_file, runtime)

    def on_signal(signum: int, frame: object) -> None:
        # A plain handler rather than the loop's: it arms the bound even if the loop is stuck.
        hard_stop.arm()
        loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # Whichever thread the kernel hands the signal to, a byte here wakes the loop so that the
    # handler runs at once (as loop.add_signal_handler would arrange).
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    loop.add_reader(wake_r.fileno(), wake_r.recv, 512)
    parent_watch = asyncio.create_task(_stop_with_parent(parent_pid, stop)) if parent_pid else None
    try:
        await stop.wait()
    finally:
        deadline = hard_stop.arm() - STOP_MARGIN_S
        if parent_watch is not None:
            parent_watch.cancel()
        log.info(
            "stopping: letting requests in flight finish (up to %.0f s); gone within %.0f s",
            SHUTDOWN_GRACE_S,
            STOP_BOUND_S,
        )
        remove_if_ours(conn_file, os.getpid())  # new clients must not find a host that is going
        app["deployments"].stopping(deadline)  # deploys in progress are cancelled now, copies stop
        await runner.cleanup()  # stops listening, waits for handlers, then cancels the rest
        try:
            await asyncio.wait_for(registry.shutdown(), max(0.5, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("models did not unload within the stop bound: their workers are killed")
        _kill_children()
        _remove_sockets(runtime)
        loop.remove_reader(wake_r.fileno())
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()
        log.info("stopped")
    return 0


class _HardStop:
    """The last resort behind ``STOP_BOUND_S``: a daemon timer that ends the process however stuck it is.

    A thread blocked in a read cannot be interrupted, and an exiting interpreter waits for its
    executor's threads; so once the bound has passed, the connection file goes, the workers are
    killed and the process exits without waiting for anything.
    """

    def __init__(self, conn_file: Path, runtime: Path) -> None:
        self.conn_file = conn_file
        self.runtime = runtime
        self.deadline: float | None = None

    def arm(self) -> float:
        """Start the timer (once); returns when the bound ends (monotonic)."""
        if self.deadline is None:
            self.deadline = time.monotonic() + STOP_BOUND_S
            timer = threading.Timer(STOP_BOUND_S - 0.5, self.fire)
            timer.daemon = True
            timer.start()
        return self.deadline

    def fire(self) -> None:
        try:
            log.error("the host did not stop within %.0f s: ending it now; where it was stuck:", STOP_BOUND_S)
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            remove_if_ours(self.conn_file, os.getpid())
            _kill_children()
            _remove_sockets(self.runtime)
            for handler in [*logging.getLogger("llm_nb").handlers, *logging.getLogger().handlers]:
                handler.flush()
        finally:
            os._exit(1)


def _kill_children() -> None:
    """Workers that did not end in time (and anything they started) must not outlive the host."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


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
    parser.add_argument(
        "--hub",
        action="store_true",
        help="serve every user of a JupyterHub (run by `llm-nb hub-service`, which the Hub starts)",
    )
    parser.add_argument(
        "--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1; a Hub service may need 0.0.0.0)"
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
    return asyncio.run(
        serve(
            settings,
            parent_pid=getattr(args, "parent_pid", None),
            hub=getattr(args, "hub", False),
            bind=getattr(args, "bind", "127.0.0.1"),
        )
    )
