"""Deploy copies that cannot hurt the host: capped, cancellable, regular files only, no symlink escapes,
and a host that stops within its bound whatever is in flight (issue 21, items 1, 2 and 5)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from aiohttp import web

from llm_nb.errors import InvalidRequest, LlmNbError

from .conftest import wait_for
from .test_deployments import StaticServer, auth, make_deployment

PLAIN = "def predict(payload_dict, **kwargs):\n    return payload_dict\n"
STOP_BOUND_S = 10.0
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


class SourceServer(StaticServer):
    """Sources that misbehave, over HTTP on loopback (served from a thread): endless, slow, stalled.

    None sends a Content-Length, so their size is unknown until the copy has read them.
    """

    def __init__(self) -> None:
        routes = [
            (method, f"/{kind}/{{name}}", getattr(self, kind))
            for kind in ("endless", "slow", "stall")
            for method in ("GET", "HEAD")
        ]
        super().__init__(None, routes, shutdown_timeout=0.3)  # the stalled handler is cut at stop

    def source_url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}/model.bin"

    @staticmethod
    async def _send(request: web.Request, chunk: int, pause: float, stall_after: int | None = None):
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        sent = 0
        try:
            while True:  # until the reader goes away
                if stall_after is not None and sent >= stall_after:
                    await asyncio.sleep(3600)
                await response.write(b"\0" * chunk)
                sent += chunk
                await asyncio.sleep(pause)
        except ConnectionError:
            return response

    async def endless(self, request):  # /dev/zero over HTTP
        return await self._send(request, 1024 * 1024, 0)

    async def slow(self, request):  # about 640 KB/s, for ever
        return await self._send(request, 32 * 1024, 0.05)

    async def stall(self, request):  # 64 KiB, then silence
        return await self._send(request, 64 * 1024, 0, stall_after=64 * 1024)

    async def _close(self) -> None:
        await self.runner.cleanup()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:  # the ones aiohttp cut at its shutdown_timeout, ended here rather than dropped
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def sources():
    server = SourceServer()
    yield server
    server.stop()


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def deploy_in_background(host, name: str, folder: Path) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = host.client().deploy(name, folder)
        except Exception as exc:  # what the deploy answered, checked by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def deploy_error(host, name: str, folder: Path, within: float = 30) -> LlmNbError:
    """The error a deploy answers, failing the test (not hanging it) if none comes within ``within`` s."""
    thread, outcome = deploy_in_background(host, name, folder)
    thread.join(within)
    assert not thread.is_alive(), f"the deploy of {name!r} did not answer within {within} s"
    assert "error" in outcome, f"the deploy of {name!r} should have failed: {outcome}"
    return outcome["error"]


def listed(host, name: str) -> dict | None:
    return next((d for d in host.client().deployments() if d["name"] == name), None)


def still_serves(host, tmp_path: Path) -> None:
    """The host answers, and a plain deploy still goes through, serves and goes."""
    assert host.process.poll() is None
    client = host.client()
    client.deploy("after", make_deployment(tmp_path / "after", PLAIN))
    assert requests.post(f"{host.url}/models/after/", json={"ok": 1}, headers=auth(host), timeout=30).json() == {
        "ok": 1
    }
    assert client.undeploy("after")["undeployed"] is True


def deploy_raw(host, name: str, folder: Path) -> requests.Response:
    """A deploy as any HTTP client sends it (the answer, not an exception)."""
    return requests.post(
        f"{host.url}/api/deployments/deploy", json={"name": name, "folder": str(folder)}, headers=auth(host), timeout=30
    )


def test_dev_zero_and_fifos_are_refused_before_reading(host, tmp_path):
    client = host.client()
    folder = make_deployment(
        tmp_path / "zero", PLAIN, {"download_files_from": "/dev/zero", "download_files_to": "files"}
    )
    answer = deploy_raw(host, "zero", folder)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request"
    assert "/dev/zero" in error["message"] and "character device, not a regular file" in error["message"]
    assert not (folder / "files").exists()

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it would block until a writer comes: it must never be opened
    folder = make_deployment(tmp_path / "fifo", PLAIN, {"download_files_from": str(fifo), "download_files_to": "files"})
    error = deploy_error(host, "fifo", folder)
    assert isinstance(error, InvalidRequest) and "FIFO (named pipe), not a regular file" in str(error)
    # A FIFO inside a source folder: the folder's other files are not copied either.
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"a" * 1000)
    os.mkfifo(data / "z-pipe")
    folder = make_deployment(
        tmp_path / "fifo2", PLAIN, {"download_files_from": str(data), "download_files_to": "files"}
    )
    error = deploy_error(host, "fifo2", folder)
    assert isinstance(error, InvalidRequest) and f"{data / 'z-pipe'} is a FIFO" in str(error)
    assert not (folder / "files").exists()
    assert client.deployments() == []
    still_serves(host, tmp_path)


def test_copies_over_the_size_cap_fail_and_leave_nothing(host_factory, tmp_path, sources):
    host = host_factory(LLM_NB_MAX_DOWNLOAD="4MiB")
    client = host.client()
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (6 * 1024 * 1024))
    folder = make_deployment(tmp_path / "big", PLAIN, {"download_files_from": str(big), "download_files_to": "files"})
    error = deploy_error(host, "big", folder)  # the size is known: refused before a byte is copied
    assert error.code == "download_too_large"
    assert "6.0 MiB" in str(error) and "LLM_NB_MAX_DOWNLOAD" in str(error)
    assert files_under(folder / "files") == []

    # An endless source of unknown size: stopped at the cap, its partial file removed.
    folder = make_deployment(
        tmp_path / "endless",
        PLAIN,
        {"download_files_from": sources.source_url("endless"), "download_files_to": "files"},
    )
    error = deploy_error(host, "endless", folder)
    assert error.code == "download_too_large" and "4.0 MiB" in str(error)
    assert files_under(folder / "files") == []
    assert client.deployments() == []
    still_serves(host, tmp_path)


def test_a_copy_that_would_eat_the_disks_last_free_space_is_refused(host_factory, tmp_path):
    host = host_factory(LLM_NB_MIN_FREE_DISK=str(10**18))  # more than any disk has
    (tmp_path / "w.bin").write_bytes(b"w" * 1000)
    folder = make_deployment(tmp_path / "dep", PLAIN, {"download_files_from": "../w.bin", "download_files_to": "files"})
    with pytest.raises(LlmNbError) as caught:
        host.client().deploy("dep", folder)
    assert caught.value.code == "disk_full"
    assert "LLM_NB_MIN_FREE_DISK" in str(caught.value) and "download_files_to" in str(caught.value)
    assert files_under(folder / "files") == []
    still_serves(host, tmp_path)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm, a disk nobody else fills")
def test_a_copy_of_unknown_size_stops_before_the_disk_fills(host_factory, tmp_path, sources):
    target = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="llm-nb-test-"))
    try:
        free = shutil.disk_usage(target).free
        if free < 32 * 1024 * 1024:
            pytest.skip("/dev/shm has under 32 MiB free")
        # The disk "fills" 16 MiB from now: the endless source must stop there, well under its cap.
        host = host_factory(LLM_NB_MIN_FREE_DISK=str(free - 16 * 1024 * 1024), LLM_NB_MAX_DOWNLOAD="1GiB")
        folder = make_deployment(
            tmp_path / "fill",
            PLAIN,
            {"download_files_from": sources.source_url("endless"), "download_files_to": str(target)},
        )
        error = deploy_error(host, "fill", folder)
        assert error.code == "disk_full"
        assert "stopped after" in str(error) and "LLM_NB_MIN_FREE_DISK" in str(error)
        assert list(target.iterdir()) == [], "the partial file is removed"
        still_serves(host, tmp_path)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_a_deploy_in_progress_is_listed_and_undeploy_cancels_it(host, tmp_path, sources):
    folder = make_deployment(
        tmp_path / "slow", PLAIN, {"download_files_from": sources.source_url("slow"), "download_files_to": "files"}
    )
    thread, outcome = deploy_in_background(host, "slow", folder)
    first = wait_for(
        lambda: (d := listed(host, "slow")) and d["bytes_copied"] > 0 and d, 30, message="the deploy to be listed"
    )
    assert first["state"] == "deploying" and first["version"] == 1
    wait_for(lambda: listed(host, "slow")["bytes_copied"] > first["bytes_copied"], 30, message="more bytes")
    assert (folder / "files" / "model.bin.part").exists()

    undone = host.client().undeploy("slow")
    assert undone["undeployed"] is True and undone["cancelled_deploy"] == 1
    thread.join(30)
    assert isinstance(outcome.get("error"), LlmNbError) and outcome["error"].code == "deploy_cancelled"
    assert "cancelled by an undeploy" in str(outcome["error"])
    assert files_under(folder / "files") == [], "the partial file is removed"
    assert host.client().deployments() == []
    # The name is free again, and the host deploys and serves as before.
    plain = make_deployment(tmp_path / "plain", PLAIN)
    host.client().deploy("slow", plain)
    assert requests.post(f"{host.url}/models/slow/", json={"a": 1}, headers=auth(host), timeout=30).json() == {"a": 1}


def test_a_stalled_copy_fails_after_the_stall_time(host_factory, tmp_path, sources):
    host = host_factory(LLM_NB_COPY_STALL="1.5")
    folder = make_deployment(
        tmp_path / "stall", PLAIN, {"download_files_from": sources.source_url("stall"), "download_files_to": "files"}
    )
    started = time.monotonic()
    error = deploy_error(host, "stall", folder)
    took = time.monotonic() - started
    assert error.code == "download_stalled"
    assert "no progress" in str(error) and "LLM_NB_COPY_STALL" in str(error)
    assert 1.5 <= took < 20
    assert files_under(folder / "files") == []
    assert host.client().deployments() == []
    still_serves(host, tmp_path)


def test_symlinks_that_leave_the_source_folder_are_refused_and_nothing_is_copied(host, tmp_path):
    client = host.client()
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("not yours")
    (outside / "dir" / "x.bin").write_bytes(b"x")

    for name, link, points_to in (
        ("linkfile", "leak.txt", outside / "secret.txt"),
        ("linkdir", "leakdir", outside / "dir"),
    ):
        data = tmp_path / f"data-{name}"
        data.mkdir()
        (data / "a-first.bin").write_bytes(b"a" * 100)  # sorted before the link: still not copied
        (data / link).symlink_to(points_to)
        folder = make_deployment(
            tmp_path / name, PLAIN, {"download_files_from": str(data), "download_files_to": "files"}
        )
        with pytest.raises(InvalidRequest) as caught:
            client.deploy(name, folder)
        assert f"{data / link} is a symlink to {points_to}, outside {data}" in str(caught.value)
        assert files_under(folder / "files") == [], "nothing is copied on a refusal"

    # Links that stay inside the folder are followed: their files are copied under the link's name.
    data = tmp_path / "data-inside"
    (data / "inner").mkdir(parents=True)
    (data / "a.txt").write_text("A")
    (data / "inner" / "b.txt").write_text("B")
    (data / "alias.txt").symlink_to("a.txt")
    (data / "inner-link").symlink_to("inner", target_is_directory=True)
    folder = make_deployment(
        tmp_path / "inside", PLAIN, {"download_files_from": str(data), "download_files_to": "files"}
    )
    client.deploy("inside", folder)
    assert files_under(folder / "files") == [
        "a.txt",
        "alias.txt",
        "inner",
        "inner-link",
        "inner-link/b.txt",
        "inner/b.txt",
    ]
    assert (folder / "files" / "alias.txt").read_text() == "A" and not (folder / "files" / "alias.txt").is_symlink()
    assert [d["name"] for d in client.deployments()] == ["inside"]
    still_serves(host, tmp_path)


def test_download_files_to_cannot_climb_out_of_the_deployment_folder(host, tmp_path):
    (tmp_path / "w.bin").write_bytes(b"w")
    nest = tmp_path / "a" / "b"
    folder = make_deployment(
        nest / "dep", PLAIN, {"download_files_from": "../../../w.bin", "download_files_to": "../../x"}
    )
    answer = deploy_raw(host, "climb", folder)
    assert answer.status_code == 400
    assert "download_files_to '../../x' climbs out of the deployment folder" in answer.json()["error"]["message"]
    assert not (tmp_path / "a" / "x").exists() and not (nest / "x").exists()
    # Through a symlink inside the folder: refused the same way.
    (folder / "out").symlink_to(tmp_path, target_is_directory=True)
    (folder / "model.json").write_text('{"download_files_from": "../../../w.bin", "download_files_to": "out/x"}')
    with pytest.raises(InvalidRequest, match="through a symlink"):
        host.client().deploy("climb", folder)
    assert not (tmp_path / "x").exists()
    # Inside the folder, or an absolute path given on purpose: fine.
    (folder / "model.json").write_text('{"download_files_from": "../../../w.bin", "download_files_to": "sub/../files"}')
    host.client().deploy("climb", folder)
    assert (folder / "files" / "w.bin").read_bytes() == b"w"
    still_serves(host, tmp_path)


def test_sigterm_ends_the_host_within_the_bound_with_a_copy_a_load_and_a_stream_in_flight(host, tmp_path, sources):
    client = host.client()
    client.load("smollm2")
    pieces: list[str] = []
    stream_outcome: dict = {}

    def read_stream() -> None:
        # Counting on from 10 goes on far past the stop (about 40 s here): no end of text comes first.
        body = {"model": "smollm2", "prompt": COUNTING, "max_tokens": 3000, "temperature": 0, "stream": True}
        try:
            with requests.post(
                f"{host.url}/v1/completions", json=body, headers=auth(host), stream=True, timeout=60
            ) as reply:
                for line in reply.iter_lines():
                    if line.startswith(b"data: {"):
                        pieces.append(line)
        except Exception as exc:  # cut by the stop: fine, it must only end
            stream_outcome["error"] = exc
        stream_outcome["done"] = True

    threading.Thread(target=read_stream, daemon=True).start()
    folder = make_deployment(
        tmp_path / "slow", PLAIN, {"download_files_from": sources.source_url("slow"), "download_files_to": "files"}
    )
    deploy_thread, _ = deploy_in_background(host, "slow", folder)
    wait_for(lambda: (d := listed(host, "slow")) and d["bytes_copied"] > 0, 30, message="the copy to run")
    wait_for(lambda: len(pieces) >= 2, 60, message="the stream to flow")

    load_thread = threading.Thread(
        target=lambda: _ignore_errors(lambda: host.client().load("smollm2", name="second")), daemon=True
    )
    load_thread.start()
    wait_for(
        lambda: any(m["name"] == "second" for m in host.client().status()["models"]), 30, 0.02, "the load to start"
    )
    family = wait_for(  # the host, the first model's worker and the one loading
        lambda: (
            len(f := [host.process.pid, *(c.pid for c in psutil.Process(host.process.pid).children(recursive=True))])
            >= 3
            and f
        ),
        30,
        0.02,
        "the second model's worker to start",
    )
    states = {m["name"]: m["state"] for m in host.client().status()["models"]}
    assert not stream_outcome, "the stream is still in flight"

    started = time.monotonic()
    host.process.send_signal(signal.SIGTERM)
    host.process.wait(STOP_BOUND_S + 10)
    took = time.monotonic() - started
    print(
        f"\nstopped in {took:.2f} s with a copy, a load ({states['second']}) and a stream in flight ({len(pieces)} pieces)"
    )
    assert took < STOP_BOUND_S, f"the host took {took:.1f} s to stop"
    assert host.process.returncode == 0, "the orderly stop finished within the bound"
    assert not host.connection_file.exists()
    wait_for(lambda: not any(_alive(pid) for pid in family), 5, message="every worker to end with the host")
    assert files_under(folder / "files") == [], "the cancelled copy's partial file is removed"
    for thread in (deploy_thread, load_thread):
        thread.join(30)
    wait_for(lambda: stream_outcome.get("done"), 30, message="the stream to end")


def _ignore_errors(call) -> None:
    try:
        call()
    except Exception:  # the load is cut by the stop: the test only needs it in flight
        pass


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_llm_nb_stop_during_a_deploy_copy_ends_the_host_within_the_bound(host, tmp_path, sources):
    folder = make_deployment(
        tmp_path / "slow", PLAIN, {"download_files_from": sources.source_url("slow"), "download_files_to": "files"}
    )
    deploy_thread, outcome = deploy_in_background(host, "slow", folder)
    wait_for(lambda: (d := listed(host, "slow")) and d["bytes_copied"] > 0, 30, message="the copy to run")
    family = [host.process.pid] + [c.pid for c in psutil.Process(host.process.pid).children(recursive=True)]
    started = time.monotonic()
    stop = subprocess.run(
        [sys.executable, "-m", "llm_nb.cli", "stop"], env=host.env, capture_output=True, text=True, timeout=60
    )
    assert stop.returncode == 0 and "stopping" in stop.stdout
    assert host.process.wait(STOP_BOUND_S + 10) == 0
    assert time.monotonic() - started < STOP_BOUND_S
    assert not host.connection_file.exists()
    assert not any(_alive(pid) for pid in family)
    deploy_thread.join(30)
    assert isinstance(outcome.get("error"), LlmNbError), "the deploy's caller hears that it did not happen"
    assert files_under(folder / "files") == []


def test_the_last_resort_ends_a_stuck_host_with_its_children_and_connection_file(tmp_path):
    """Past the bound, a host stuck for good (a thread in a read, a hook that hangs) is ended anyway."""
    conn = tmp_path / "host.json"
    script = textwrap.dedent(
        f"""
        import json, os, subprocess, sys, time
        from pathlib import Path
        import llm_nb.host.app as app
        app.STOP_BOUND_S = 1.0
        conn = Path({str(conn)!r})
        conn.write_text(json.dumps({{"pid": os.getpid(), "url": "http://127.0.0.1:9", "key": "k"}}))
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(child.pid, flush=True)
        app._HardStop(conn, Path({str(tmp_path)!r})).arm()
        time.sleep(120)  # stuck, as the main thread of a host that waits on something that never comes
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    child = int(process.stdout.readline())
    try:
        assert process.wait(30) == 1
        _, stderr = process.communicate(timeout=10)
        assert "did not stop within 1 s: ending it now" in stderr and "in <module>" in stderr  # where it was stuck
        assert not conn.exists()
        wait_for(lambda: not _alive(child), 10, message="its child to be killed")
    finally:
        process.kill()
        if _alive(child):
            psutil.Process(child).kill()


HANGING_CLEANUP = """
import time

def predict(payload_dict, **kwargs):
    return payload_dict

def cleanup(model_meta=None, *args, **kwargs):
    time.sleep(600)
"""


def test_a_cleanup_that_never_returns_does_not_hold_up_the_stop(host, tmp_path):
    host.client().deploy("stuck", make_deployment(tmp_path / "stuck", HANGING_CLEANUP))
    (worker,) = host.worker_pids()
    started = time.monotonic()
    host.process.send_signal(signal.SIGTERM)
    assert host.process.wait(STOP_BOUND_S + 10) == 0
    assert time.monotonic() - started < STOP_BOUND_S
    wait_for(lambda: not _alive(worker), 5, message="the stuck worker to be killed")
    assert not host.connection_file.exists()
