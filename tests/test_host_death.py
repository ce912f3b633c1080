"""A host that dies under a call: the call fails fast and says why; only the next call starts a host.

Run as a busy notebook box is: two busy-loop processes share the two cores
with the host, its worker and the clients. Each call runs in a client process
of its own, as a kernel's would, against a host that a client started (so its
launcher records how it ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from llm_nb.api import Session
from llm_nb.client import AsyncClient, Client
from llm_nb.connection import live_host, pid_alive, read_connection
from llm_nb.errors import HostUnavailable, LlmNbError
from llm_nb.processes import exit_record_path, read_exit

from .conftest import host_env, wait_for

pytestmark = pytest.mark.slow

# Each run kills a host and starts the next (about 12 s on 2 busy cores): 6 per case keeps the suite
# inside its 40 minutes; LLM_NB_HOST_DEATH_RUNS=50 for a soak.
RUNS_PER_CASE = int(os.environ.get("LLM_NB_HOST_DEATH_RUNS", "6"))
ERROR_WITHIN_S = 5.0

# A kernel's call: stream a long reply; say when the stream opened and when the first piece came.
CALL = """
import json, sys, time
import llm_nb
out = lambda **kw: print(json.dumps(kw), flush=True)
try:
    pieces = llm_nb.chat("Write a very long story about the sea.", model="smollm2", stream=True,
                         max_tokens=2000, temperature=0)
    out(at="opened", t=time.time())
    for i, piece in enumerate(pieces):
        if i == 0:
            out(at="first", t=time.time())
    out(at="finished", t=time.time())
except Exception as exc:
    history = llm_nb.history()
    kept = history[-1]["content"] if history and history[-1]["role"] == "assistant" else ""
    out(at="error", t=time.time(), type=type(exc).__name__, message=str(exc), kept=len(kept))
"""

# The call after: a short chat that may start a host (and must say so) and load the model.
NEXT_CALL = """
import llm_nb
print(llm_nb.chat("Say hi.", model="smollm2", max_tokens=4, temperature=0))
"""


@pytest.fixture
def busy_cores():
    """Two busy loops on the two cores, as notebooks computing beside the host."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for loop in loops:
        loop.kill()
        loop.wait(10)


@pytest.fixture
def client_env(tmp_path, monkeypatch):
    env = host_env(tmp_path)
    env.pop("LLM_NB_CLIENT_NAME", None)
    for key in ("JUPYTER_RUNTIME_DIR", "LLM_NB_CONNECTION", "LLM_NB_CATALOG"):
        monkeypatch.setenv(key, env[key])
    yield env
    _stop_hosts(Path(env["LLM_NB_CONNECTION"]))


def _host_processes(conn: Path) -> list[psutil.Process]:
    """Live host processes (not their launchers) serving ``conn``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "llm_nb.host" in cmdline and str(conn) in cmdline:
            found.append(proc)
    return found


def _stop_hosts(conn: Path) -> None:
    for proc in _host_processes(conn):
        try:
            proc.kill()
        except psutil.Error:
            pass
    wait_for(lambda: not _host_processes(conn), 20, 0.1, "every host of the test to end")


def _run(env: dict, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _events(text: str) -> dict[str, dict]:
    events = {}
    for line in text.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            events[event["at"]] = event
    return events


def _kill(pid: int) -> float:
    os.kill(pid, signal.SIGKILL)
    return time.time()


def _worker_of(host_pid: int) -> psutil.Process:
    (worker,) = [c for c in psutil.Process(host_pid).children() if "llm_nb.worker" in " ".join(c.cmdline())]
    return worker


@contextlib.contextmanager
def _frozen_worker(host_pid: int):
    """The model's worker stopped (SIGSTOP): a request reaches the host and waits for its first token."""
    worker = _worker_of(host_pid)
    worker.suspend()
    try:
        yield worker
    finally:
        with contextlib.suppress(psutil.Error):
            worker.resume()  # a stopped worker would hold a host-death signal pending; let it act on it


def _wait_in_flight(info: dict, count: int, what: str) -> None:
    wait_for(lambda: _in_flight(info["url"], info["key"]) >= count, 60, 0.02, what)


def _in_flight(url: str, key: str) -> int:
    try:
        status = requests.get(f"{url}/api/status", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
    except requests.RequestException:
        return 0
    return sum(m["in_flight"] for m in status["models"] if m["name"] == "smollm2")


def test_a_call_whose_host_dies_fails_fast_and_only_the_next_call_starts_one_host(client_env, busy_cores):
    env = client_env
    conn = Path(env["LLM_NB_CONNECTION"])
    first = _run(env, NEXT_CALL)  # starts the first host (no previous one: nothing to say) and loads the model
    assert first.returncode == 0, first.stderr
    assert "started a new host" not in first.stderr
    outcomes = []
    for run in range(2 * RUNS_PER_CASE):
        case = "before the status line" if run < RUNS_PER_CASE else "mid-stream"
        info = live_host(conn)
        assert info is not None
        host_pid = info["pid"]
        call = subprocess.Popen(
            [sys.executable, "-c", CALL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            if case == "before the status line":
                # The worker is stopped: the call reaches the host and waits for its first token, with
                # no status line sent yet (the first heartbeat would send it, 3 s on).
                with _frozen_worker(host_pid):
                    _wait_in_flight(info, 1, "the call to reach the host")
                    killed = _kill(host_pid)
            else:
                line = call.stdout.readline()
                while line and json.loads(line)["at"] != "first":
                    line = call.stdout.readline()
                assert line, call.stderr.read()
                killed = _kill(host_pid)
            stdout, stderr = call.communicate(timeout=60)
        finally:
            if call.poll() is None:
                call.kill()
        events = _events(stdout)
        assert "error" in events, f"{case}: the call did not fail: {stdout}\n{stderr}"
        error = events["error"]
        outcomes.append((case, error["t"] - killed))
        assert error["type"] == "HostUnavailable", error
        assert f"host (pid {host_pid}) was killed by SIGKILL during this call" in error["message"], error
        assert error["t"] - killed < ERROR_WITHIN_S, (
            f"{case}: the error came {error['t'] - killed:.1f} s after the kill"
        )
        if case == "before the status line":
            assert "opened" not in events, "the host died before it answered the call's request"
        else:
            assert error["kept"] > 0, "the partial reply is kept in the conversation"
        # The failing call started no host and loaded nothing.
        assert "started a new host" not in stderr, stderr
        assert _host_processes(conn) == [] and live_host(conn) is None

        # The next call starts exactly one new host, says so in one line, and answers: from Python,
        # or from the command line every other time.
        if run % 2:
            after = subprocess.run(
                [sys.executable, "-m", "llm_nb.cli", "chat", "smollm2", "Say hi.", "--max-tokens", "4"],
                env=env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        else:
            after = _run(env, NEXT_CALL)
        assert after.returncode == 0, after.stderr
        notices = [line for line in after.stderr.splitlines() if "started a new host" in line]
        new_pid = read_connection(conn)["pid"]
        assert notices == [
            f"llm-nb: started a new host (pid {new_pid}): the previous one (pid {host_pid}) was killed by SIGKILL"
        ], after.stderr
        assert [p.pid for p in _host_processes(conn)] == [new_pid]
    slowest = max(outcomes, key=lambda o: o[1])
    print(f"\n{len(outcomes)} calls failed after the kill in at most {slowest[1]:.2f} s ({slowest[0]})")


def test_the_async_client_fails_fast_too_and_its_next_call_starts_the_host(client_env, busy_cores):
    conn = Path(client_env["LLM_NB_CONNECTION"])

    async def scenario() -> None:
        async with AsyncClient(on_notice=notices.append) as client:
            for case in ("before the status line", "mid-stream"):
                await client.load("smollm2")
                info = await client.host_info()
                stream = client.chat_stream("Write a very long story about the sea.", "smollm2", max_tokens=2000)
                pieces = stream.__aiter__()
                if case == "before the status line":
                    with _frozen_worker(info["pid"]):
                        opening = asyncio.ensure_future(anext(pieces))
                        await asyncio.to_thread(_wait_in_flight, info, 1, "the call to reach the host")
                        killed = _kill(info["pid"])
                    with pytest.raises(HostUnavailable) as caught:
                        await opening
                else:
                    assert await anext(pieces)
                    killed = _kill(info["pid"])
                    with pytest.raises(HostUnavailable) as caught:
                        async for _ in pieces:
                            pass
                    assert stream.text, "the partial reply is kept"
                assert time.time() - killed < ERROR_WITHIN_S
                assert f"(pid {info['pid']}) was killed by SIGKILL during this call" in str(caught.value)
                assert notices == [] and live_host(conn) is None, "the failing call started no host"
                await client.load("smollm2")  # the next call: one new host, and one line that says so
                new_pid = (await client.host_info())["pid"]
                assert notices == [
                    f"started a new host (pid {new_pid}): the previous one (pid {info['pid']}) was killed by SIGKILL"
                ]
                assert [p.pid for p in _host_processes(conn)] == [new_pid]
                notices.clear()

    notices: list[str] = []
    asyncio.run(scenario())


def test_fire_reports_the_requests_a_dying_host_was_serving_as_errors(client_env, busy_cores):
    from llm_nb import consume

    client = Client()
    client.load("smollm2")
    info = client.host_info()
    killed: list[float] = []

    def kill_once_both_requests_are_in() -> None:
        # One request generating and one waiting behind it: then the host dies.
        _wait_in_flight(info, 2, "two of fire's requests to reach the host")
        killed.append(_kill(info["pid"]))

    killer = threading.Thread(target=kill_once_both_requests_are_in, daemon=True)
    killer.start()
    report = consume.fire(
        f"{info['url']}/v1", ["Write a long story about the sea."] * 4, concurrency=2, max_tokens=400,
        compare_sequential=False, progress=False, model="smollm2",
    )  # fmt: skip
    ended = time.time()
    killer.join(5)
    assert killed, "the host was killed while fire ran"
    assert ended - killed[0] < ERROR_WITHIN_S, f"the run stalled: it ended {ended - killed[0]:.1f} s after the kill"
    assert len(report.errors) >= 2, "the requests in flight when the host died are errors"
    assert all(r.error for r in report.errors)
    assert live_host(Path(client_env["LLM_NB_CONNECTION"])) is None, "fire starts no host"


def test_a_silent_host_is_an_error_within_the_read_timeout_not_a_hung_call(client_env):
    """SIGSTOP: the connection stays open but nothing comes, not even a heartbeat."""
    from llm_nb.config import stream_read_timeout

    client = Client()
    client.load("smollm2")
    pid = client.host_info()["pid"]
    stream = client.chat("Write a very long story about the sea.", "smollm2", stream=True, max_tokens=2000)
    pieces = iter(stream)
    next(pieces)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        with pytest.raises(HostUnavailable) as caught:
            for _ in pieces:
                pass
        waited = time.monotonic() - stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    assert waited < stream_read_timeout() + 3
    assert f"host (pid {pid}) sent nothing" in str(caught.value) and "not even a heartbeat" in str(caught.value)
    assert stream.text, "the partial reply is kept"


def test_the_host_sends_heartbeats_while_a_request_waits(client_env, monkeypatch):
    """A request whose worker is busy gets its status line and heartbeat comments, not silence, then its reply."""
    monkeypatch.setenv("LLM_NB_HEARTBEAT", "0.5")  # for the host this client starts
    client = Client()
    client.load("smollm2")
    info = client.host_info()
    with (
        _frozen_worker(info["pid"]),
        requests.post(
            f"{info['url']}/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
            headers={"Authorization": f"Bearer {info['key']}"},
            stream=True,
            timeout=(5, 30),
        ) as response,
    ):
        assert response.status_code == 200, "the status line goes out after one heartbeat interval"
        said = (line for line in response.iter_lines() if line)
        assert next(said).startswith(b"data:")  # the role chunk
        assert [next(said), next(said)] == [b": heartbeat"] * 2, "then heartbeats while the worker is busy"
    # The worker runs again and serves.
    assert client.chat("Hi", "smollm2", max_tokens=4)
    client.shutdown()


def test_a_host_killed_by_the_oom_killer_is_named_and_its_models_are_not_reloaded_by_themselves(client_env):
    if not os.access("/dev/kmsg", os.W_OK):
        pytest.skip("writing the kernel log (/dev/kmsg) needs root")
    conn = Path(client_env["LLM_NB_CONNECTION"])
    notices: list[str] = []
    session = Session()
    session.on_notice = notices.append
    session.load("smollm2")
    pid = session.client.host_info()["pid"]
    # The line the kernel writes when its OOM killer picks a process; written here for this host's pid,
    # then the same SIGKILL the OOM killer sends.
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"Out of memory: Killed process {pid} (python) total-vm:1000kB, anon-rss:900kB (llm-nb test)\n")
    _kill(pid)
    wait_for(lambda: read_exit(conn, pid), 10, 0.05, "the launcher to record the exit")
    assert read_exit(conn, pid)["oom"] is True
    with pytest.raises(LlmNbError) as caught:
        session.chat("Hello again?", max_tokens=4)
    assert caught.value.code == "host_oom_killed"
    assert "OOM killer" in str(caught.value) and "%llm_load smollm2" in str(caught.value)
    assert len(notices) == 1 and "the kernel's OOM killer" in notices[0] and f"(pid {pid})" in notices[0]
    new = session.client.host_info()
    assert new["pid"] != pid
    assert Client(conn, autostart=False).status()["models"] == [], "the model was not loaded again by itself"
    # Asked for explicitly, it loads.
    session.load("smollm2")
    assert session.chat("Say hi.", max_tokens=4, temperature=0)
    assert exit_record_path(conn).stat().st_mode & 0o777 == 0o600
    assert pid_alive(new["pid"])


def test_the_widget_panel_says_that_it_started_a_new_host(client_env):
    from llm_nb.widgets import Panel

    session = Session()
    session.on_notice = lambda message: pytest.fail(f"the panel's notice went to the session: {message}")
    session.load("smollm2")
    pid = session.client.host_info()["pid"]
    _kill(pid)
    wait_for(lambda: not pid_alive(pid), 10, 0.05, "the host to die")
    panel = Panel(session, interval=60)
    try:
        panel._guard(panel._load)()  # what the Load button runs, here in this thread
        new_pid = session.client.host_info()["pid"]
        notice = f"started a new host (pid {new_pid}): the previous one (pid {pid}) was killed by SIGKILL"
        assert notice in panel.host_notice.value, (panel.message.value, session.notices)
        assert "smollm2" in panel.message.value and "loaded in" in panel.message.value
        assert session.notices == [
            f"started a new host (pid {new_pid}): the previous one (pid {pid}) was killed by SIGKILL"
        ]
    finally:
        panel.close()
