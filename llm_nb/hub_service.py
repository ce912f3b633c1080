"""``llm-nb hub-service``: one model host for every user of a JupyterHub, run by the Hub.

The Hub starts this command as a managed service (``c.JupyterHub.services``) and
stops it when the Hub stops. The host itself must outlive a Hub restart (users'
servers and models keep running while the Hub is upgraded), so this process is
only its keeper: it starts the host in a session of its own (``--hub``, on the
service's URL), or adopts the one a previous Hub left running. When the Hub
stops it, the host goes on; when the host dies, it starts a fresh one (and gives
up, exiting non-zero for the Hub to restart it, if the host keeps dying).

``configure_jupyterhub(c)`` is the operator's one call in ``jupyterhub_config.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

from .connection import pid_alive, read_connection
from .errors import LlmNbError

#: What the service's role must grant: list users and read their servers (to end the leases of a
#: server that stopped) and read users (to know who is an admin).
SERVICE_SCOPES = ["list:users", "read:users", "read:servers"]
ADMIN_SCOPE = "custom:llm-nb:admin"
DEFAULT_PORT = 8765
HOST_START_TIMEOUT_S = 120.0
#: A host that ends more than MAX_RESTARTS times within CRASH_WINDOW_S is not started again here.
MAX_RESTARTS = 5
CRASH_WINDOW_S = 300.0


def state_dir(service_name: str) -> Path:
    """Where the keeper keeps the host's connection file and the service token (0700)."""
    explicit = os.environ.get("LLM_NB_HUB_STATE")
    if explicit:
        return Path(explicit).expanduser()
    from platformdirs import user_state_dir

    return Path(user_state_dir("llm-nb")) / f"hub-{service_name}"


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def _stop_host(info: dict) -> None:
    try:
        requests.post(info["url"] + "/api/shutdown", headers={"Authorization": f"Bearer {info['key']}"}, timeout=5)
    except requests.RequestException:
        pass
    deadline = time.monotonic() + 15
    while pid_alive(info.get("pid")) and time.monotonic() < deadline:
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llm-nb hub-service",
        description="Run the shared model host as a JupyterHub service (the Hub starts this; see the README).",
    )
    parser.add_argument("--bind", help="address the host listens on (default: the service URL's host)")
    parser.add_argument(
        "--stop-with-hub",
        action="store_true",
        help="stop the host when the Hub stops this service (default: the host outlives a Hub restart)",
    )
    parser.add_argument("--memory-budget", help="e.g. 60GiB (default: 90%% of GPU memory, else 50%% of RAM)")
    parser.add_argument("--keep-alive", help="seconds an unheld model stays loaded (default 300; -1 forever)")
    args = parser.parse_args(argv)

    service_url = os.environ.get("JUPYTERHUB_SERVICE_URL", "")
    if not service_url or not os.environ.get("JUPYTERHUB_API_URL"):
        print(
            "llm-nb hub-service: JUPYTERHUB_SERVICE_URL and JUPYTERHUB_API_URL are not set; this command is run by "
            "JupyterHub as a service. See `llm_nb.hub_service.configure_jupyterhub` and the README's Hub section.",
            file=sys.stderr,
        )
        return 2
    parsed = urlparse(service_url)
    port = parsed.port or DEFAULT_PORT
    bind = args.bind or (parsed.hostname if parsed.hostname not in (None, "localhost") else "127.0.0.1")
    name = os.environ.get("JUPYTERHUB_SERVICE_NAME", "llm-nb")
    folder = state_dir(name)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    # The token of the Hub that runs now; a host that outlived the previous Hub reads it from here.
    token_file = folder / "service-token"
    _write_secret(token_file, os.environ.get("JUPYTERHUB_API_TOKEN", ""))
    conn = folder / "host.json"

    from .locator import spawn_host

    previous = read_connection(conn)
    if previous and pid_alive(previous.get("pid")) and urlparse(previous["url"]).port != port:
        print(f"llm-nb hub-service: the running host listens on {previous['url']}, not port {port}: replacing it")
        _stop_host(previous)
    host_args = ["--hub", "--port", str(port), "--bind", bind]
    if args.memory_budget:
        host_args += ["--memory-budget", args.memory_budget]
    if args.keep_alive:
        host_args += ["--keep-alive", args.keep_alive]
    env = {**os.environ, "LLM_NB_HUB_TOKEN_FILE": str(token_file)}

    def start() -> tuple[dict, bool] | None:
        try:
            return spawn_host(conn, host_args=host_args, env=env, timeout=HOST_START_TIMEOUT_S)
        except LlmNbError as exc:
            print(f"llm-nb hub-service: {exc}", file=sys.stderr, flush=True)
            return None

    first = start()
    if first is None:
        return 1
    info, started = first
    how = "started" if started else "adopted the host left running by the previous Hub:"
    print(f"llm-nb hub-service: {how} host pid {info['pid']} at {info['url']} (state in {folder})", flush=True)

    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    crashes: list[float] = []
    while not stopping:
        time.sleep(0.5)
        if stopping or pid_alive(info.get("pid")):
            continue
        # The host died (a crash, an OOM kill, kill -9): start a fresh one at once, so that users' next
        # calls find it and hear that it was restarted. Crashing again and again, give up: the Hub
        # restarts this service, and its log says why.
        now = time.monotonic()
        crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
        print(
            f"llm-nb hub-service: the host (pid {info['pid']}) ended; see {conn.with_suffix('.log')}",
            file=sys.stderr,
            flush=True,
        )
        if len(crashes) > MAX_RESTARTS:
            print(f"llm-nb hub-service: the host ended {len(crashes)} times in {CRASH_WINDOW_S:.0f} s; giving up")
            return 1
        time.sleep(min(30.0, 0.5 * 2 ** (len(crashes) - 1)))
        restarted = start()
        if restarted is None:
            return 1
        info = restarted[0]
        print(f"llm-nb hub-service: restarted the host: pid {info['pid']} at {info['url']}", flush=True)
    if args.stop_with_hub:
        _stop_host(info)
        print("llm-nb hub-service: stopped the host with the Hub", flush=True)
    else:
        print(f"llm-nb hub-service: the Hub stops; the host (pid {info['pid']}) keeps running", flush=True)
    return 0


def configure_jupyterhub(
    c,
    *,
    name: str = "llm-nb",
    port: int = DEFAULT_PORT,
    url: str | None = None,
    user_share: str | float | None = None,
    user_shares: dict | None = None,
    admin_groups: list[str] | None = None,
    environment: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> None:
    """Turn on one shared llm-nb host for every user, from ``jupyterhub_config.py``::

        from llm_nb.hub_service import configure_jupyterhub
        configure_jupyterhub(c, user_share="25%")

    It adds the managed service, its role (``SERVICE_SCOPES``), the ``custom:llm-nb:admin``
    scope, and ``LLM_NB_HUB_URL`` in every user's server environment (their kernels and
    panel use the service instead of a host of their own).
    """
    url = url or f"http://127.0.0.1:{port}"
    env = dict(environment or {})
    if user_share is not None:
        env["LLM_NB_USER_SHARE"] = str(user_share)
    if user_shares:
        import json

        env["LLM_NB_USER_SHARES"] = json.dumps(user_shares)
    if admin_groups:
        env["LLM_NB_ADMIN_GROUPS"] = ",".join(admin_groups)
    c.JupyterHub.services.append(
        {
            "name": name,
            "url": url,
            "command": command or [sys.executable, "-m", "llm_nb.cli", "hub-service"],
            "environment": env,
            "display": False,
        }
    )
    c.JupyterHub.load_roles.append({"name": f"{name}-service", "services": [name], "scopes": list(SERVICE_SCOPES)})
    c.JupyterHub.custom_scopes.update(
        {ADMIN_SCOPE: {"description": "Unload any user's model on the shared llm-nb host, and stop it"}}
    )
    c.Spawner.environment.update({"LLM_NB_HUB_URL": url, "LLM_NB_HUB_SERVICE": name})
    # A user granted the admin scope (a role with custom:llm-nb:admin) carries it in their server's token,
    # so their kernels and panel act as llm-nb admins: the Hub gives a server only the scopes its user holds.
    if "server_token_scopes" in c.Spawner:
        scopes = c.Spawner.server_token_scopes
        if isinstance(scopes, list) and ADMIN_SCOPE not in scopes:
            c.Spawner.server_token_scopes = [*scopes, ADMIN_SCOPE]
    else:  # the Hub's default (its "server" role), plus ours
        c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server", ADMIN_SCOPE]
