"""Start real ``jupyter server`` / ``jupyter lab`` processes on loopback for tests.

Token auth and XSRF stay on (``allow_unauthenticated_access=False``), config,
runtime, settings and workspace dirs live in the test's tmp dir, and stopping
checks that the server took its model host with it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

SERVER_START_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningJupyter:
    process: subprocess.Popen
    url: str
    token: str
    root: Path
    runtime_dir: Path
    log_path: Path
    env: dict = field(repr=False)

    def api(self) -> requests.Session:
        """A session that authenticates with the token header, as JupyterLab's own requests do."""
        session = requests.Session()
        session.headers["Authorization"] = f"token {self.token}"
        return session

    def llm(self, path: str) -> str:
        return f"{self.url}/llm-nb/api/{path}"

    def snapshot(self) -> dict:
        response = self.api().get(self.llm("status"), timeout=10)
        response.raise_for_status()
        return response.json()

    def host_pid(self) -> int | None:
        return self.snapshot()["host"]["pid"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 40) -> None:
        """SIGTERM (as a service manager would), then SIGKILL for the server and anything it left."""
        if self.process.poll() is None:
            children = _descendants(self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            for child in children:  # kernels and hosts that outlived the server: never leave them
                if child.is_running():
                    child.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def start_jupyter(
    tmp: Path, app: str = "server", *args: str, env_extra: dict[str, str] | None = None
) -> RunningJupyter:
    """Start ``jupyter server`` or ``jupyter lab`` with token auth on a free loopback port."""
    token = secrets.token_hex(16)
    port = free_port()
    root = tmp / "notebooks"
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("LLM_NB_CONNECTION", None)  # the server sets its own for its kernels
    env.update(
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-workspaces"),
        IPYTHONDIR=str(tmp / "ipython"),
        LLM_NB_CATALOG=str(tmp / "catalog.json"),  # no user catalog leaks in
        PYTHONUNBUFFERED="1",
    )
    env.update(env_extra or {})
    module = {"server": "jupyter_server", "lab": "jupyterlab"}[app]
    argv = [
        sys.executable,
        "-m",
        module,
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        "--ServerApp.allow_unauthenticated_access=False",
        '--ServerApp.jpserver_extensions={"llm_nb": True}',
        f"--ServerApp.root_dir={root}",
        *args,
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")  # CI containers run as root
    log_path = tmp / f"jupyter-{app}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    running = RunningJupyter(process, url, token, root, tmp / "runtime", log_path, env)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if running.api().get(f"{url}/api/status", timeout=2).status_code == 200:
                return running
        except requests.RequestException:
            pass
        time.sleep(0.2)
    running.stop()
    raise RuntimeError(f"jupyter {app} did not start:\n{log_path.read_text(errors='replace')[-4000:]}")


def write_notebook(path: Path, cells: list[str] | None = None) -> Path:
    """A notebook with a python3 kernelspec, so opening it asks no question."""
    notebook = {
        "cells": [
            {
                "id": f"cell-{i}",
                "cell_type": "code",
                "metadata": {},
                "source": source,
                "outputs": [],
                "execution_count": None,
            }
            for i, source in enumerate(cells or [""])
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook))
    return path


def wait_until(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (requests.RequestException, KeyError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message} (last: {last!r})")
