"""Where a kernel-side request goes: a host found (or started) from its connection file, or a fixed URL.

``spawn_host`` is the one way anything starts a host: the clients (through
``HostLocator``), the Jupyter server extension's supervisor (from a thread) and
the benchmarks. It runs the host under ``llm_nb.launcher``, which records how
the host ended, so that whoever comes next can say so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import requests

from .config import stream_read_timeout
from .connection import live_host, pid_alive, read_connection
from .errors import HostUnavailable, LlmNbError, print_notice
from .processes import how_host_ended, tail
from .transport import read_timed_out

HOST_START_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 20


def spawn_host(
    path: Path,
    *,
    host_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = HOST_START_TIMEOUT_S,
) -> tuple[dict, bool]:
    """The live host of connection file ``path``, starting one if none answers: ``(info, started_here)``.

    Under the file lock, so that many clients racing (and the Jupyter server's
    supervisor) get one host. The host runs under ``llm_nb.launcher`` in a session
    of its own (a kernel interrupt or exit, or a Ctrl-C at the server's prompt,
    must not reach it), and its output goes to ``path`` with the suffix ``.log``.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with FileLock(str(path) + ".lock", timeout=timeout):
            info = live_host(path)
            if info is not None:
                return info, False
            return _start(path, list(host_args), env, timeout), True
    except Timeout:
        raise HostUnavailable(
            f"another process holds {path}.lock for more than {timeout:.0f} s; is a host starting there?"
        ) from None


def _start(path: Path, host_args: list[str], env: dict[str, str] | None, timeout: float) -> dict:
    log_path = path.with_suffix(".log")
    argv = [sys.executable, "-m", "llm_nb.launcher", "--connection-file", str(path), *host_args]
    with open(log_path, "ab", buffering=0) as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    # The launcher is reaped from a daemon thread, so that it never lingers as a zombie of this process.
    threading.Thread(target=process.wait, name="llm-nb-launcher-reaper", daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_connection(path)
        if info and pid_alive(info.get("pid")) and live_host(path):
            return info
        if process.poll() is not None:
            break
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()  # the launcher forwards nothing after SIGKILL: end its host by its own pid too
        info = read_connection(path)
        if info and pid_alive(info.get("pid")):
            os.kill(int(info["pid"]), signal.SIGKILL)
        why = f"did not answer within {timeout:.0f} s"
    else:
        why = f"ended while starting (its launcher exited with code {process.returncode})"
    raise HostUnavailable(
        f"the llm-nb host {why}; last lines of {log_path}:\n{tail(log_path, LOG_TAIL_LINES)}\n"
        "run `llm-nb host` in a terminal to see why"
    )


class Locator(Protocol):
    """Where requests go (``find``), and what to say when the host is lost under one (``lost``)."""

    #: True when another host may take over (a connection file): then a request that never reached
    #: the host, or was refused with 401, is sent once more to the host found next.
    replaceable: bool
    info: dict | None

    def find(self, refresh: bool = False) -> dict: ...

    def lost(self, info: dict, exc: BaseException) -> LlmNbError: ...

    def no_answer(self, what: str) -> LlmNbError: ...


class FixedHost:
    """A host at a known URL with a known key or token (a deployment's model.py, another machine)."""

    replaceable = False

    def __init__(self, url: str, credential: str):
        self.info = {"url": url.rstrip("/"), "key": credential}

    def find(self, refresh: bool = False) -> dict:
        return self.info

    def lost(self, info: dict, exc: BaseException) -> LlmNbError:
        if read_timed_out(exc):
            return HostUnavailable(
                f"the llm-nb host at {info['url']} sent nothing for {stream_read_timeout():.0f} s, not even a "
                "heartbeat: it is hung or overloaded; the call was given up"
            )
        return HostUnavailable(f"the llm-nb host at {info['url']} does not answer: {exc}")

    def no_answer(self, what: str) -> LlmNbError:
        return HostUnavailable(f"the llm-nb host at {self.info['url']} closed the {what} stream without an answer")


class _Announcing:
    """What both locators of a replaceable host keep: the host found, how the one before ended, notices."""

    def __init__(self, on_notice: Callable[[str], None] | None):
        self.on_notice = on_notice or print_notice
        self.info: dict | None = None
        #: How the host before the current one ended (its exit record), when this client saw it go.
        self.previous_exit: dict | None = None
        self.notices: list[str] = []
        self._lock = threading.Lock()

    def announce(self, message: str) -> None:
        self.notices.append(message)
        self.on_notice(message)


class HubLocator(_Announcing):
    """The host a JupyterHub runs for all its users (``llm-nb hub-service``), called with this user's own
    Hub API token; the Hub's host is never started or replaced from here.

    Found by ``LLM_NB_HUB_URL`` (``configure_jupyterhub`` sets it in every user's server) and
    ``JUPYTERHUB_API_TOKEN`` (the Hub sets it in every user's server and kernel).
    """

    #: A request that never reached the host (restarted by the Hub's service) is sent once more, to the new one.
    replaceable = True

    def __init__(self, url: str, token: str, on_notice: Callable[[str], None] | None = None):
        super().__init__(on_notice)
        self.url = url.rstrip("/")
        self.token = token

    def find(self, refresh: bool = False) -> dict:
        with self._lock:
            if self.info is not None and not refresh:
                return self.info
            try:
                answer = requests.get(self.url + "/health", timeout=5)
                answer.raise_for_status()
                health = answer.json()
            except (requests.RequestException, ValueError) as exc:
                raise HostUnavailable(
                    f"the JupyterHub's llm-nb service at {self.url} does not answer ({exc}); it is shared by every "
                    "user, so ask the Hub's admin (the service's log says why). LLM_NB_HUB=0 runs a host of your own."
                ) from None
            info = {"url": self.url, "key": self.token, "pid": health.get("pid"), "started": health.get("started")}
            previous = self.info
            if previous is not None and previous.get("pid") != info["pid"]:
                self.previous_exit = {"pid": previous.get("pid"), "reason": "restarted", "replaced_at": time.time()}
                self.announce(
                    f"the JupyterHub's llm-nb host was restarted (pid {previous.get('pid')} is now {info['pid']}): "
                    "models loaded before must be loaded again"
                )
            self.info = info
            return info

    def lost(self, info: dict, exc: BaseException) -> LlmNbError:
        if read_timed_out(exc):
            return HostUnavailable(
                f"the JupyterHub's llm-nb host at {self.url} sent nothing for {stream_read_timeout():.0f} s, not "
                "even a heartbeat: it is hung or overloaded; the call was given up"
            )
        self.info = None  # the next call asks again, and says so if the host was restarted
        return HostUnavailable(
            f"the JupyterHub's llm-nb host at {self.url} stopped answering during this call ({type(exc).__name__}); "
            "it is shared by every user and restarted by the Hub. The next call finds it again; models loaded "
            "before a restart must be loaded again",
            pid=info.get("pid"),
        )

    def no_answer(self, what: str) -> LlmNbError:
        return HostUnavailable(f"the JupyterHub's llm-nb host closed the {what} stream without an answer")


def hub_locator(on_notice: Callable[[str], None] | None = None) -> HubLocator | None:
    """The Hub's shared host when this process runs in a user's server of a Hub that has one
    (and ``LLM_NB_HUB`` is not ``0``); else None: a host of one's own, as without a Hub."""
    url = os.environ.get("LLM_NB_HUB_URL", "").strip()
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "").strip()
    if not url or not token or os.environ.get("LLM_NB_HUB", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return HubLocator(url, token, on_notice)


class HostLocator(_Announcing):
    """Finds the host of one connection file, and says what became of the one before.

    A host is started here only when none answers *before* a request is sent
    (no connection file, a stale one, a refused connection); a host that dies
    while a request runs makes that request fail (``lost``), never a new host.
    """

    replaceable = True

    def __init__(self, connection_file: Path, autostart: bool, on_notice: Callable[[str], None] | None = None):
        super().__init__(on_notice)
        self.connection_file = connection_file
        self.autostart = autostart

    def find(self, refresh: bool = False) -> dict:
        with self._lock:
            # A host whose process is gone is found missing here, before anything is sent (so a pooled
            # connection to it is never tried, which would look like a call the host died under).
            if self.info is not None and not refresh and pid_alive(self.info.get("pid")):
                return self.info
            previous = self.info or read_connection(self.connection_file)
            info = live_host(self.connection_file)
            started = False
            if info is None:
                if not self.autostart:
                    raise HostUnavailable(
                        f"no llm-nb host answers for {self.connection_file}; start one with `llm-nb host`"
                    )
                info, started = spawn_host(self.connection_file)
            if previous is not None and previous.get("pid") != info.get("pid"):
                self._replaced(previous, info, started)
            self.info = info
            return info

    def _replaced(self, previous: dict, info: dict, started: bool) -> None:
        pid = previous.get("pid")
        how, record = how_host_ended(self.connection_file, pid, wait=1.0)
        self.previous_exit = dict(record or {"pid": pid}, reason=how, replaced_at=time.time())
        if started:
            message = f"started a new host (pid {info['pid']}): the previous one (pid {pid}) {how}"
        else:
            message = f"a new host (pid {info['pid']}) took over: the previous one (pid {pid}) {how}"
        self.announce(message)

    def lost(self, info: dict, exc: BaseException) -> HostUnavailable:
        """The error for a request whose host stopped answering after it was sent."""
        pid = info.get("pid")
        if read_timed_out(exc) and pid_alive(pid):
            return HostUnavailable(
                f"the llm-nb host (pid {pid}) sent nothing for {stream_read_timeout():.0f} s, not even a heartbeat: "
                "it is hung or overloaded; the call was given up. `llm-nb logs` and the host log say more; "
                "`llm-nb stop` ends it, and the next call starts a new one",
                pid=pid,
            )
        deadline = time.monotonic() + 1.0  # a killed process may take a moment to be gone
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid):
            return HostUnavailable(
                f"the connection to the llm-nb host (pid {pid}) broke during this call ({type(exc).__name__}); "
                "the host still runs: try the call again",
                pid=pid,
            )
        how, record = how_host_ended(self.connection_file, pid, wait=0.5)
        return HostUnavailable(
            f"the llm-nb host (pid {pid}) {how} during this call; it was not restarted inside the call. "
            "The next call starts a new host, where models must be loaded again",
            pid=pid,
            oom=bool(record and record.get("oom")) or None,
        )

    def no_answer(self, what: str) -> LlmNbError:
        return HostUnavailable(f"the host closed the {what} stream without an answer")
