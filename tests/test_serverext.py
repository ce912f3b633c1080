"""The Jupyter server extension, against a real ``jupyter server`` with token auth and XSRF on.

A server starts its own model host when its first kernel starts, gives every
kernel the host's connection file, proxies the panel's REST calls with the
host key (never shown to the browser), restarts a crashed host and stops it
with the server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from jupyter_client import BlockingKernelClient

from .jupyter_servers import RunningJupyter, start_jupyter, wait_until

pytestmark = pytest.mark.timeout(240)

ROUTES = [
    ("GET", "status"),
    ("GET", "events"),
    ("GET", "catalog"),
    ("POST", "models/load"),
    ("POST", "models/unload"),
    ("GET", "models/smollm2/logs"),
    ("POST", "chat"),
    ("GET", "host"),
    ("POST", "host"),
    ("GET", "host/log"),
    ("GET", "deployments"),
    ("POST", "deployments/undeploy"),
]


@pytest.fixture(scope="module")
def jserver(tmp_path_factory) -> RunningJupyter:
    server = start_jupyter(tmp_path_factory.mktemp("jserver"), "server")
    yield server
    server.stop()


class Kernel:
    """A notebook session started through the server's REST API, driven over ZMQ."""

    def __init__(self, server: RunningJupyter, notebook: str):
        response = server.api().post(
            f"{server.url}/api/sessions",
            json={"path": notebook, "name": notebook, "type": "notebook", "kernel": {"name": "python3"}},
            timeout=60,
        )
        response.raise_for_status()
        self.server = server
        self.session_id = response.json()["id"]
        self.kernel_id = response.json()["kernel"]["id"]
        connection = server.runtime_dir / f"kernel-{self.kernel_id}.json"
        wait_until(connection.exists, 30, message=f"{connection}")
        self.client = BlockingKernelClient(connection_file=str(connection))
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 120) -> str:
        """Run ``code``; return its stdout, or raise with the kernel's traceback."""
        out: list[str] = []
        errors: list[str] = []

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                errors.append("\n".join(msg["content"]["traceback"]))

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=timeout)
        if reply["content"]["status"] != "ok":
            raise AssertionError(f"kernel error:\n{''.join(errors)}")
        return "".join(out)

    def run_json(self, code: str, timeout: float = 120) -> dict:
        return json.loads(self.run(code, timeout).strip().splitlines()[-1])

    def close(self) -> None:
        self.client.stop_channels()
        self.server.api().delete(f"{self.server.url}/api/sessions/{self.session_id}", timeout=30)


def connection_file_of(server: RunningJupyter) -> Path:
    return server.runtime_dir / f"llm-nb-host-{server.process.pid}.json"


class EventReader:
    """Collects the panel's event stream in a thread, as the panel does."""

    def __init__(self, server: RunningJupyter):
        self.events: list[dict] = []
        self._stopped = False
        self._response = server.api().get(server.llm("events"), stream=True, timeout=(5, 60))
        self._response.raise_for_status()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            with self._response:
                for line in self._response.iter_lines(decode_unicode=True):
                    if self._stopped:
                        return
                    if line and line.startswith("data:"):
                        self.events.append(json.loads(line[5:]))
        except (requests.RequestException, ValueError, OSError):
            pass  # the server went away

    def stop(self) -> None:
        # Closing the response from here would block until the reader's next chunk (a keep-alive
        # comes every 15 s): the daemon thread stops at its next line instead, or with the server.
        self._stopped = True


# --- auth -------------------------------------------------------------------------


def test_every_route_refuses_requests_without_the_token(jserver):
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "token wrong-token"}):
            response = requests.request(method, jserver.llm(path), headers=headers, json={}, timeout=10)
            assert response.status_code == 403, (method, path, headers, response.status_code)
            assert "key" not in response.text
    for method in ("GET", "POST"):  # a deployment's API, which the server passes on to the host
        response = requests.request(method, f"{jserver.url}/llm-nb/models/echo/", json={}, timeout=10)
        assert response.status_code == 403, method


def test_posts_need_the_xsrf_token_when_authenticated_by_cookie(jserver):
    browser = requests.Session()
    login = browser.get(f"{jserver.url}/login", timeout=10)
    xsrf = browser.cookies.get("_xsrf")
    assert login.status_code == 200 and xsrf
    response = browser.post(
        f"{jserver.url}/login", data={"password": jserver.token, "_xsrf": xsrf}, allow_redirects=False, timeout=10
    )
    assert response.status_code == 302, response.text
    # Logged in by cookie: reading works, but a POST without the XSRF header is refused.
    assert browser.get(jserver.llm("host"), timeout=10).status_code == 200
    refused = browser.post(jserver.llm("models/unload"), json={"model": "nothing"}, timeout=10)
    assert refused.status_code == 403
    assert "_xsrf" in refused.text
    allowed = browser.post(
        jserver.llm("models/unload"), json={"model": "nothing"}, headers={"X-XSRFToken": xsrf}, timeout=10
    )
    assert allowed.status_code != 403  # past auth and XSRF: the extension itself answers


def test_no_handler_lacks_an_auth_decorator(tmp_path):
    # The extension template's check: a server that forbids unauthenticated access warns about
    # every handler verb without @web.authenticated; ours must raise no such warning.
    script = """
import warnings
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import JupyterServerAuthWarning
app = ServerApp(allow_unauthenticated_access=False, jpserver_extensions={"llm_nb": True},
                reraise_server_extension_failures=True)
with warnings.catch_warnings(record=True) as records:
    warnings.simplefilter("always")
    app.initialize(argv=[], find_extensions=False, new_httpserver=False)
bad = [str(r.message) for r in records if issubclass(r.category, JupyterServerAuthWarning)]
print("\\n".join(bad) or "all authenticated")
"""
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "all authenticated", result.stdout + result.stderr


# --- one host per server ------------------------------------------------------------


def test_first_kernel_starts_the_host_and_notebooks_share_it(jserver):
    snapshot = jserver.snapshot()
    assert snapshot["host"]["state"] == "stopped"  # opening the panel starts nothing
    assert jserver.api().get(jserver.llm("catalog"), timeout=30).json()["models"]["smollm2"]["backend"] == "llamacpp"

    a = Kernel(jserver, "a.ipynb")
    b = Kernel(jserver, "b.ipynb")
    try:
        wait_until(lambda: jserver.snapshot()["host"]["state"] == "running", 30, message="host running")
        code = (
            "import json, os\n"
            "from llm_nb.client import Client\n"
            "c = Client(autostart=False)\n"
            "r = c.load('smollm2')\n"
            "print(json.dumps({'conn': os.environ.get('LLM_NB_CONNECTION'), 'attached': r['attached'],"
            " 'host_pid': c.host_info()['pid']}))\n"
        )
        first = a.run_json(code)
        second = b.run_json(code)
        assert first["conn"] == second["conn"] == str(connection_file_of(jserver))
        assert first["host_pid"] == second["host_pid"] == jserver.host_pid()
        assert (first["attached"], second["attached"]) == (False, True)  # one copy of the weights

        snapshot = jserver.snapshot()
        (model,) = snapshot["models"]
        assert model["name"] == "smollm2" and model["state"] == "ready"
        assert model["backend"] == "llamacpp" and model["device"] == "cpu"
        assert model["memory_bytes"] > 50 * 2**20  # measured from the worker, not a guess
        holders = sorted(Path(lease["name"]).name for lease in model["leases"])
        assert holders == ["a.ipynb", "b.ipynb"]
        assert snapshot["budget_bytes"] > 0 and snapshot["budget_kind"] in ("ram", "gpu")

        # The browser never sees the host's key or address.
        info = json.loads(connection_file_of(jserver).read_text())
        everything = json.dumps(snapshot) + jserver.api().get(jserver.llm("host"), timeout=10).text
        assert info["key"] not in everything and info["url"] not in everything

        # The panel's unload does not pull a model from under the notebooks that hold it...
        refused = jserver.api().post(jserver.llm("models/unload"), json={"model": "smollm2"}, timeout=30)
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["code"] == "model_in_use"
        assert sorted(Path(h).name for h in error["holders"]) == ["a.ipynb", "b.ipynb"]
        # ...force does, and the notebooks' next call says the model is gone.
        forced = jserver.api().post(jserver.llm("models/unload"), json={"model": "smollm2", "force": True}, timeout=60)
        assert forced.status_code == 200 and forced.json()["unloaded"] is True
        after = a.run_json(
            "import json\n"
            "try:\n"
            "    c.chat('hi', model='smollm2', max_tokens=4)\n"
            "    print(json.dumps({'code': None}))\n"
            "except Exception as exc:\n"
            "    print(json.dumps({'code': getattr(exc, 'code', None), 'message': str(exc)}))\n"
        )
        assert after["code"] == "model_not_found", after
        assert jserver.snapshot()["models"] == []
    finally:
        a.close()
        b.close()


def test_panel_loads_chats_with_a_stream_and_unloads(jserver):
    reader = EventReader(jserver)
    events = reader.events
    api = jserver.api()

    loaded = api.post(jserver.llm("models/load"), json={"model": "smollm2", "keep_alive": "1m"}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    model = loaded.json()["model"]
    assert model["state"] == "ready" and model["leases"][0]["name"] == "LLM panel (JupyterLab)"

    chunks: list[str] = []
    with api.post(
        jserver.llm("chat"),
        # Greedy: a sampled reply may end after two tokens ("Shelter."), too short to show streaming.
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Count to five."}],
            "max_tokens": 24,
            "temperature": 0,
        },
        stream=True,
        timeout=120,
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        done = False
        for line in response.iter_lines(decode_unicode=True):
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data:"):
                for choice in json.loads(line[5:])["choices"]:
                    if choice["delta"].get("content"):
                        chunks.append(choice["delta"]["content"])
    assert done and len(chunks) >= 3 and "".join(chunks).strip()

    log = api.get(jserver.llm("models/smollm2/logs"), timeout=30)
    assert log.status_code == 200 and "llm_nb.worker" in log.text
    host_log = api.get(jserver.llm("host/log"), timeout=30)
    assert host_log.status_code == 200 and "listening on http://127.0.0.1" in host_log.text

    missing = api.post(
        jserver.llm("chat"), json={"model": "not-loaded", "messages": [{"role": "user", "content": "x"}]}, timeout=30
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

    unloaded = api.post(jserver.llm("models/unload"), json={"model": "smollm2"}, timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["unloaded"] is True

    wait_until(
        lambda: (
            any(not e["models"] for e in events[1:]) and any(m["state"] == "ready" for e in events for m in e["models"])
        ),
        30,
        message="the event stream to show the load and the unload",
    )
    reader.stop()
    versions = [e["version"] for e in events]
    assert versions == sorted(versions)


def test_deployments_are_listed_called_and_undeployed_through_the_server(jserver, tmp_path):
    from llm_nb.client import Client

    from .test_deployments import make_deployment

    api = jserver.api()
    api.post(jserver.llm("host"), json={"action": "start"}, timeout=60).raise_for_status()
    host = Client(connection_file_of(jserver), autostart=False)
    host.deploy("proxied", make_deployment(tmp_path / "proxied"))
    try:
        listed = api.get(jserver.llm("deployments"), timeout=30).json()["deployments"]
        assert [d["name"] for d in listed] == ["proxied"]
        wait_until(
            lambda: [d["name"] for d in jserver.snapshot()["deployments"]] == ["proxied"], 10, message="the snapshot"
        )
        url = f"{jserver.url}/llm-nb/models/proxied/"
        posted = api.post(url, json={"user_prompt": "hi"}, timeout=30)
        assert posted.status_code == 200 and posted.json()["echo"] == {"user_prompt": "hi"}
        # By GET the query string is the payload; Jupyter's token in it is not passed on.
        by_query = requests.get(url.rstrip("/"), params={"q": "1", "token": jserver.token}, timeout=30)
        assert by_query.status_code == 200 and by_query.json()["echo"] == {"q": "1"}
        meta = api.get(url, params={"get_meta": "true"}, timeout=30).json()
        assert (meta["name"], meta["requests_served"]) == ("proxied", 2)
        missing = api.post(f"{jserver.url}/llm-nb/models/nothing/", json={}, timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

        undone = api.post(jserver.llm("deployments/undeploy"), json={"name": "proxied"}, timeout=60)
        assert undone.status_code == 200 and undone.json()["requests_served"] == 2
        assert host.deployments() == []
        wait_until(lambda: jserver.snapshot()["deployments"] == [], 10, message="the snapshot without it")
        again = api.post(jserver.llm("deployments/undeploy"), json={"name": "proxied"}, timeout=60)
        assert again.status_code == 404 and "no deployment 'proxied'" in again.json()["error"]["message"]
    finally:
        if host.deployments():
            host.undeploy("proxied")


def test_a_crashed_host_is_restarted_and_the_panel_is_told(jserver):
    api = jserver.api()
    api.post(jserver.llm("host"), json={"action": "start"}, timeout=60).raise_for_status()
    old_pid = jserver.host_pid()
    reader = EventReader(jserver)
    events = reader.events
    time.sleep(0.5)
    os.kill(old_pid, signal.SIGKILL)

    host = wait_until(
        lambda: (h := jserver.snapshot()["host"])["state"] == "running" and h["pid"] != old_pid and h,
        60,
        message="a new host",
    )
    assert host["restarts"] >= 1
    assert host["last_exit"]["reason"] == "was killed by SIGKILL"
    assert host["last_exit"]["pid"] == old_pid
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    wait_until(lambda: any(e["host"]["state"] == "restarting" for e in events), 10, message="a restarting event")
    reader.stop()
    # The new host answers the same connection file with a new key.
    status = api.post(jserver.llm("models/load"), json={"model": "smollm2"}, timeout=120)
    assert status.status_code == 200, status.text
    api.post(jserver.llm("models/unload"), json={"model": "smollm2", "force": True}, timeout=60)


# --- settings and shutdown ---------------------------------------------------------------


def test_settings_come_from_config_and_env_and_the_host_stops_with_the_server(tmp_path):
    server = start_jupyter(
        tmp_path,
        "server",
        "--LlmNbExtension.keep_alive=7s",
        env_extra={"LLM_NB_MEMORY_BUDGET": "3GiB", "LLM_NB_START_POLICY": "startup"},
    )
    try:
        host = wait_until(
            lambda: (h := server.snapshot()["host"])["state"] == "running" and h, 30, message="host at start-up"
        )
        api = server.api()
        loaded = api.post(server.llm("models/load"), json={"model": "smollm2"}, timeout=120)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["model"]["keep_alive"] == 7.0
        snapshot = server.snapshot()
        assert snapshot["budget_bytes"] == 3 * 2**30 and snapshot["server"]["start_policy"] == "startup"
        worker_pid = snapshot["models"][0]["worker_pid"]
        conn = connection_file_of(server)
        assert conn.exists()
    finally:
        server.stop()
    # Stopping the server stopped its host, the host's worker, and removed the connection file.
    for pid in (host["pid"], worker_pid):
        wait_until(lambda pid=pid: not psutil.pid_exists(pid), 10, message=f"pid {pid} gone")
    assert not conn.exists()
    assert "model host stopped" in server.log()


def test_the_host_dies_with_a_killed_server(tmp_path):
    server = start_jupyter(
        tmp_path,
        "server",
        "--LlmNbExtension.ray_address=10.9.8.7:6379",
        env_extra={"LLM_NB_START_POLICY": "startup"},
    )
    try:
        host = wait_until(
            lambda: (h := server.snapshot()["host"])["state"] == "running" and h, 30, message="host at start-up"
        )
        # The trait reaches the host: its engine="ray" deployments go to that cluster.
        assert psutil.Process(host["pid"]).environ()["LLM_NB_RAY_ADDRESS"] == "10.9.8.7:6379"
        server.process.kill()  # no stop_extension: the host must notice by itself
        server.process.wait(10)
        wait_until(lambda: not psutil.pid_exists(host["pid"]), 15, message="the orphaned host to stop")
    finally:
        server.stop()


def test_a_host_that_cannot_start_is_reported_with_its_log(tmp_path):
    # A broken setting in the host's environment: it exits at once with a traceback.
    server = start_jupyter(tmp_path, "server", '--LlmNbExtension.host_env={"LLM_NB_MAX_QUEUE": "lots"}')
    try:
        response = server.api().post(server.llm("models/load"), json={"model": "smollm2"}, timeout=120)
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "host_unavailable"
        assert "ValueError" in error["message"] and "lots" in error["message"]  # the log's last lines
        assert server.snapshot()["host"]["state"] == "failed"
    finally:
        server.stop()


def test_a_host_that_keeps_crashing_is_given_up_until_restarted(tmp_path):
    server = start_jupyter(tmp_path, "server", "--LlmNbExtension.max_restarts=0")
    try:
        api = server.api()
        api.post(server.llm("host"), json={"action": "start"}, timeout=60).raise_for_status()
        os.kill(server.host_pid(), signal.SIGKILL)
        host = wait_until(
            lambda: (h := server.snapshot()["host"])["state"] == "failed" and h, 30, message="the host given up"
        )
        assert "crashed 1 times" in host["error"] and "restart it from the LLM panel" in host["error"]
        restarted = api.post(server.llm("host"), json={"action": "restart"}, timeout=60)
        assert restarted.status_code == 200 and restarted.json()["state"] == "running"
    finally:
        server.stop()


# --- packaging ------------------------------------------------------------------------


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_the_installed_extensions_are_enabled():
    """After ``pip install .`` (or ``-e .``) both halves are found and enabled with no manual step."""
    server = subprocess.run(
        [sys.executable, "-m", "jupyter", "server", "extension", "list"], capture_output=True, text=True, timeout=120
    )
    out = _plain(server.stdout + server.stderr)
    assert re.search(r"llm_nb\s+enabled", out), out
    assert re.search(r"llm_nb \S+ OK", out), out
    lab = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True, text=True, timeout=120
    )
    out = _plain(lab.stdout + lab.stderr)
    assert re.search(r"llm-nb v\S+ enabled\s+OK", out), out
