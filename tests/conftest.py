"""Fixtures that start real processes on loopback and always stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from llm_nb.client import Client
from llm_nb.connection import live_host, read_connection

HOST_START_S = 30


@dataclass
class RunningHost:
    """A host process started for a test, with a client bound to it."""

    process: subprocess.Popen
    connection_file: Path
    runtime_dir: Path
    env: dict

    @property
    def info(self) -> dict:
        return read_connection(self.connection_file)

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def key(self) -> str:
        return self.info["key"]

    def client(self, **kwargs) -> Client:
        return Client(self.connection_file, autostart=False, **kwargs)

    def worker_pids(self) -> list[int]:
        try:
            return [
                c.pid for c in psutil.Process(self.process.pid).children() if "llm_nb.worker" in " ".join(c.cmdline())
            ]
        except psutil.Error:
            return []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def host_env(tmp: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        JUPYTER_RUNTIME_DIR=str(tmp / "rt"),
        LLM_NB_CONNECTION=str(tmp / "rt" / "host.json"),
        LLM_NB_CATALOG=str(tmp / "catalog.json"),
        LLM_NB_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def start_host(tmp: Path, *args: str, **env_extra: str) -> RunningHost:
    env = host_env(tmp, **env_extra)
    conn = Path(env["LLM_NB_CONNECTION"])
    conn.parent.mkdir(parents=True, exist_ok=True)
    log = open(tmp / "host-stdout.log", "ab")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_nb.host", "--connection-file", str(conn), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + HOST_START_S
    while time.monotonic() < deadline:
        info = read_connection(conn)
        if info and info.get("pid") == process.pid and live_host(conn):
            return RunningHost(process, conn, Path(info["runtime_dir"]), env)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"host did not start:\n{(tmp / 'host-stdout.log').read_text()[-3000:]}")


@pytest.fixture
def host_factory(tmp_path: Path, monkeypatch) -> Iterator:
    """Start hosts with ``host_factory(*cli_args, **env)``; all are stopped after the test."""
    started: list[RunningHost] = []

    def factory(*args: str, **env_extra: str) -> RunningHost:
        host = start_host(tmp_path, *args, **env_extra)
        for key in ("JUPYTER_RUNTIME_DIR", "LLM_NB_CONNECTION", "LLM_NB_CATALOG"):
            monkeypatch.setenv(key, host.env[key])
        started.append(host)
        return host

    yield factory
    for host in started:
        host.stop()


@pytest.fixture
def host(host_factory) -> RunningHost:
    return host_factory()


@pytest.fixture
def client(host) -> Client:
    return host.client()


@pytest.fixture(scope="module")
def shared_host(tmp_path_factory) -> Iterator[RunningHost]:
    """One host with the default model loaded, for read-only tests of a module."""
    tmp = tmp_path_factory.mktemp("shared-host")
    host = start_host(tmp)
    client = host.client()
    client.load("smollm2", keep_alive=-1)
    yield host
    host.stop()


def wait_for(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")
