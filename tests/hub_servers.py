"""A real JupyterHub on loopback for tests, with llm-nb as its service.

The Hub runs with the ``DummyAuthenticator`` and the ``SimpleLocalProcessSpawner``
(every user's server is a local ``jupyterhub-singleuser``), configurable-http-proxy
from npm, its database and state in the test's tmp dir, and an admin service token
for the test's REST calls. Users log in through the Hub's REST API; their kernels
are started through the Hub's proxy and driven over the Jupyter websocket protocol
with ``jupyter_client``'s message format. ``stop`` ends the Hub, the proxy, every
user's server and kernel, and the shared host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
from jupyter_client.session import Session

from tests.jupyter_servers import _descendants, free_port

HUB_START_S = 90
SERVER_START_S = 90
REPO = Path(__file__).resolve().parent.parent


def proxy_command() -> str | None:
    """configurable-http-proxy: the one ``make install-test`` puts beside the venv, else PATH."""
    local = REPO / ".venv" / "chp" / "node_modules" / ".bin" / "configurable-http-proxy"
    return str(local) if local.exists() else shutil.which("configurable-http-proxy")


CONFIG = """
import sys
from llm_nb.hub_service import configure_jupyterhub

settings = {settings!r}
c = get_config()  # noqa: F821
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = settings["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
# The proxy runs on its own (as zero-to-jupyterhub runs it): users' connections survive a Hub restart.
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:%d" % settings["proxy_api_port"]
c.ConfigurableHTTPProxy.auth_token = settings["proxy_token"]
c.ConfigurableHTTPProxy.should_start = False
c.JupyterHub.cleanup_servers = False  # users' servers outlive a Hub restart, as on most production hubs
c.JupyterHub.db_url = "sqlite:///" + settings["dir"] + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = settings["dir"] + "/cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.Authenticator.admin_users = set(settings["admins"])
c.JupyterHub.spawner_class = "simple"
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.args = settings["server_args"]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
c.Spawner.environment = dict(settings["user_env"])
c.SimpleLocalProcessSpawner.home_dir_template = settings["dir"] + "/home/{{username}}"
c.JupyterHub.services = [{{"name": "test-admin", "api_token": settings["admin_token"]}}]
c.JupyterHub.load_roles = [
    {{"name": "test-admin", "services": ["test-admin"], "scopes": ["admin:users", "admin:servers", "tokens", "list:users", "read:users"]}},
    # erin is an llm-nb admin by the custom scope alone, not a Hub admin
    {{"name": "llm-nb-admins", "users": ["erin"], "scopes": ["custom:llm-nb:admin"]}},
]
configure_jupyterhub(c, port=settings["service_port"], environment=settings["service_env"], user_share=settings["share"])
"""


@dataclass
class RunningHub:
    process: subprocess.Popen
    url: str
    admin_token: str
    dir: Path
    service_url: str
    log_path: Path
    env: dict = field(repr=False)
    config_path: Path = field(repr=False, default=None)
    #: Every process the Hub started, across its restarts: what ``stop`` must see gone.
    seen: dict = field(repr=False, default_factory=dict)
    proxy: subprocess.Popen | None = field(repr=False, default=None)

    def api(self, token: str | None = None) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"token {token or self.admin_token}"
        return session

    def hub_api(self, path: str) -> str:
        return f"{self.url}/hub/api{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def add_user(self, name: str, admin: bool = False) -> str:
        """Create ``name`` and return an API token of theirs (as a user makes one on the Hub's token page)."""
        api = self.api()
        response = api.post(self.hub_api(f"/users/{name}"), json={"admin": admin}, timeout=30)
        assert response.status_code in (201, 409), response.text
        response = api.post(
            self.hub_api(f"/users/{name}/tokens"), json={"note": "test", "expires_in": 3600}, timeout=30
        )
        response.raise_for_status()
        return response.json()["token"]

    def start_server(self, name: str, token: str) -> str:
        """Start the user's server (as a login does) and wait until it answers; its URL through the proxy."""
        api = self.api(token)
        response = api.post(self.hub_api(f"/users/{name}/server"), timeout=60)
        assert response.status_code in (201, 202, 400), response.text  # 400: already running
        deadline = time.monotonic() + SERVER_START_S
        url = f"{self.url}/user/{name}"
        while time.monotonic() < deadline:
            model = self.api().get(self.hub_api(f"/users/{name}"), timeout=10).json()
            server = (model.get("servers") or {}).get("")
            if server and server.get("ready"):
                if api.get(f"{url}/api/status", timeout=10).status_code == 200:
                    return url
            time.sleep(0.5)
        raise RuntimeError(f"{name}'s server did not start:\n{self.log()[-4000:]}")

    def stop_server(self, name: str) -> None:
        response = self.api().delete(self.hub_api(f"/users/{name}/server"), timeout=60)
        assert response.status_code in (202, 204), response.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            model = self.api().get(self.hub_api(f"/users/{name}"), timeout=10).json()
            if not model.get("servers"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"{name}'s server did not stop")

    def host_info(self) -> dict:
        return json.loads((self.dir / "state" / "host.json").read_text())

    def remember(self) -> None:
        for proc in _descendants(self.process.pid):
            self.seen[proc.pid] = proc

    def stop_hub(self) -> None:
        """SIGTERM the Hub alone, as an upgrade does: users' servers and the shared host go on."""
        self.remember()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def start_again(self) -> None:
        """Start the Hub again with the same config (same ports, database, service)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(self.config_path)],
            cwd=self.dir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        _wait_until_up(self)

    def stop(self) -> None:
        """Stop every user's server, then the Hub (the proxy and the service with it), then the shared host
        (which outlives the Hub by design), then anything left of what the Hub ever started."""
        self.remember()
        if self.process.poll() is None:
            try:
                users = self.api().get(self.hub_api("/users"), timeout=10).json()
                for user in users:
                    if user.get("servers"):
                        self.api().delete(self.hub_api(f"/users/{user['name']}/server"), timeout=30)
            except (requests.RequestException, ValueError):
                pass
        self.stop_hub()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
        stop_shared_host(self.dir)
        for proc in self.seen.values():
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.Error:
                pass


def stop_shared_host(hub_dir: Path) -> None:
    try:
        info = json.loads((hub_dir / "state" / "host.json").read_text())
    except (OSError, ValueError):
        return
    try:
        host = psutil.Process(info["pid"])
    except psutil.Error:
        return
    children = host.children(recursive=True)
    host.terminate()
    try:
        host.wait(20)
    except psutil.TimeoutExpired:
        host.kill()
    for child in children:
        if child.is_running():
            child.kill()


def start_hub(
    tmp: Path, *, admins=("admin",), share: str = "1", service_env: dict | None = None, user_env: dict | None = None
) -> RunningHub:
    proxy = proxy_command()
    if proxy is None:
        raise RuntimeError("configurable-http-proxy is not installed: `make install-test` installs it")
    tmp.mkdir(parents=True, exist_ok=True)
    port, service_port = free_port(), free_port()
    admin_token = secrets.token_hex(16)
    proxy_token = secrets.token_hex(16)
    hub_port, proxy_api_port = free_port(), free_port()
    common = {
        "LLM_NB_CATALOG": str(tmp / "catalog.json"),
        "LLM_NB_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    settings = {
        "port": port,
        "hub_port": hub_port,
        "proxy_api_port": proxy_api_port,
        "proxy_token": proxy_token,
        "service_port": service_port,
        "proxy": proxy,
        "dir": str(tmp),
        "admins": list(admins),
        "admin_token": admin_token,
        "share": share,
        "server_args": ["--allow-root"] if os.geteuid() == 0 else [],
        "user_env": {**common, **(user_env or {})},
        "service_env": {
            **common,
            "LLM_NB_HUB_STATE": str(tmp / "state"),
            "LLM_NB_HUB_POLL_S": "1",
            "JUPYTER_RUNTIME_DIR": str(tmp / "service-runtime"),
            **(service_env or {}),
        },
    }
    config_path = tmp / "jupyterhub_config.py"
    config_path.write_text(CONFIG.format(settings=settings))
    env = dict(os.environ)
    for name in ("LLM_NB_CONNECTION", "LLM_NB_HUB_URL", "JUPYTERHUB_API_TOKEN"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp / "jupyterhub.log"
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    proxy_process = subprocess.Popen(
        [
            proxy,
            "--ip=127.0.0.1",
            f"--port={port}",
            "--api-ip=127.0.0.1",
            f"--api-port={proxy_api_port}",
            f"--default-target=http://127.0.0.1:{hub_port}",
            f"--error-target=http://127.0.0.1:{hub_port}/hub/error",
        ],
        env={**env, "CONFIGPROXY_AUTH_TOKEN": proxy_token},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(config_path)],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    hub = RunningHub(
        process, f"http://127.0.0.1:{port}", admin_token, tmp, f"http://127.0.0.1:{service_port}", log_path, env
    )
    hub.config_path = config_path
    hub.proxy = proxy_process
    try:
        _wait_until_up(hub)
    except RuntimeError:
        hub.stop()
        raise
    return hub


def _wait_until_up(hub: RunningHub) -> None:
    deadline = time.monotonic() + HUB_START_S
    while time.monotonic() < deadline:
        if hub.process.poll() is not None:
            break
        try:
            if requests.get(hub.hub_api("/"), timeout=2).status_code == 200 and _answers(hub.service_url):
                hub.remember()
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the Hub or its llm-nb service did not start:\n{hub.log()[-6000:]}")


def first_token_s(url: str, token: str, model: str, max_tokens: int = 4) -> float:
    """Seconds from sending a streaming chat to ``url``'s host until its first piece of text."""
    started = time.perf_counter()
    with requests.post(
        url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
        },
        stream=True,
        timeout=300,
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data: ") and b'"content"' in line:
                return time.perf_counter() - started
    raise AssertionError("the stream ended without a token")


def keep_in_flight(url: str, token: str, model: str, count: int, stop, max_tokens: int) -> list[threading.Thread]:
    """``count`` threads, each sending one streaming chat after another until ``stop`` (an Event) is set."""

    def loop() -> None:
        while not stop.is_set():
            try:
                first_token_s(url, token, model, max_tokens)
            except Exception:  # a refused or broken request: the next one goes on
                time.sleep(0.05)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


class RemoteKernel:
    """A kernel in a user's server, started and driven through the Hub's proxy (REST + the kernel websocket)."""

    def __init__(self, server_url: str, token: str, name: str = "python3", notebook: str | None = None):
        import websocket  # websocket-client, which jupyter_server's own tests use

        self.server_url = server_url
        self.token = token
        self.api = requests.Session()
        self.api.headers["Authorization"] = f"token {token}"
        if notebook:  # a session, as JupyterLab opens one for a notebook (JPY_SESSION_NAME in the kernel)
            response = self.api.post(
                f"{server_url}/api/sessions",
                json={"path": notebook, "type": "notebook", "name": notebook, "kernel": {"name": name}},
                timeout=60,
            )
            response.raise_for_status()
            self.kernel_id = response.json()["kernel"]["id"]
        else:
            response = self.api.post(f"{server_url}/api/kernels", json={"name": name}, timeout=60)
            response.raise_for_status()
            self.kernel_id = response.json()["id"]
        ws_url = server_url.replace("http://", "ws://") + f"/api/kernels/{self.kernel_id}/channels"
        self.session = Session(key=b"", session=uuid.uuid4().hex)
        self.ws = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"], timeout=300)

    def run(self, code: str, timeout: float = 300) -> tuple[dict, str]:
        """Execute ``code``; returns (the execute_reply's content, everything it printed or displayed)."""
        msg = self.session.msg("execute_request", {"code": code, "silent": False, "store_history": False})
        msg["channel"] = "shell"
        self.ws.send(json.dumps(msg, default=str))
        msg_id = msg["header"]["msg_id"]
        output, reply, idle = [], None, False
        deadline = time.monotonic() + timeout
        self.ws.settimeout(timeout)
        while (reply is None or not idle) and time.monotonic() < deadline:
            incoming = json.loads(self.ws.recv())
            if incoming.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = incoming["msg_type"], incoming["content"]
            if kind == "stream":
                output.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                output.append(data.get("text/plain", "") + "\n")
            elif kind == "error":
                output.append("\n".join(content.get("traceback", [])))
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
            elif kind == "execute_reply":
                reply = content
        if reply is None:
            raise TimeoutError(f"no reply within {timeout} s to {code!r}; output so far: {''.join(output)}")
        return reply, "".join(output)

    def pid(self) -> int | None:
        reply, out = self.run("import os; print(os.getpid())")
        return int(out.strip().splitlines()[-1])

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.api.delete(f"{self.server_url}/api/kernels/{self.kernel_id}", timeout=30)
