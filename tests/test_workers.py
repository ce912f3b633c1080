"""Model workers: one process per model, memory back on unload, no orphans, crash isolation."""

from __future__ import annotations

import os
import signal
import struct
import time

import psutil
import pytest

from llm_nb.errors import ModelCrashed

from .conftest import wait_for


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))


def test_a_load_starts_one_worker_and_unload_gives_memory_back(host):
    client = host.client()
    # One cycle first: the host's own one-time imports (the GGUF reader of the memory
    # estimate, numpy) are not memory that a model holds.
    client.load("smollm2", keep_alive=0)
    client.unload("smollm2")
    before = tree_rss(host.process.pid)
    result = client.load("smollm2", keep_alive=0)
    (worker_pid,) = host.worker_pids()
    assert result["model"]["worker_pid"] == worker_pid
    client.chat("Say something.", "smollm2", max_tokens=16)  # touch the weights: they count once used
    loaded = tree_rss(host.process.pid)
    took = loaded - before
    assert took > 80 * 1024**2, f"the load took only {took} bytes?"
    assert client.unload("smollm2")["unloaded"] is True
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
    after = tree_rss(host.process.pid)
    given_back = (loaded - after) / took
    assert given_back >= 0.9, f"gave back {given_back:.0%} of {took / 2**20:.0f} MiB"


def test_status_reports_memory_measured_from_the_worker(host):
    client = host.client()
    client.load("smollm2")
    (worker_pid,) = host.worker_pids()
    model = client.status()["models"][0]
    rss = psutil.Process(worker_pid).memory_info().rss
    assert model["worker_pid"] == worker_pid
    assert abs(model["rss_bytes"] - rss) / rss < 0.25
    # No GPU here: the RAM budget counts RSS, and the room the conversation cache may still fill.
    cache = model["info"]["prompt_cache"]
    assert cache["cap_bytes"] > 0 and cache["bytes"] == 0
    assert model["memory_bytes"] == model["rss_bytes"] + cache["cap_bytes"]


def test_kill_9_of_the_host_ends_every_worker_within_5_s(host):
    client = host.client()
    client.load("smollm2")
    client.load("smollm2", name="smollm2-b")
    workers = host.worker_pids()
    assert len(workers) == 2
    host.process.send_signal(signal.SIGKILL)
    host.process.wait(10)
    killed = time.monotonic()

    def all_gone() -> bool:
        return all(
            not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in workers
        )

    wait_for(all_gone, 5, 0.05, "workers to exit after the host died")
    assert time.monotonic() - killed < 5


def test_kill_9_of_a_worker_mid_stream_fails_that_model_only(host):
    client = host.client()
    client.load("smollm2", name="victim")
    client.load("smollm2", name="bystander")
    victim_pid = next(m["worker_pid"] for m in client.status()["models"] if m["name"] == "victim")
    stream = client.chat("Tell me a long story about the sea.", "victim", stream=True, max_tokens=400, temperature=0)
    pieces = iter(stream)
    next(pieces)
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(ModelCrashed) as caught:
        for _ in pieces:
            pass
    assert time.monotonic() - killed < 2
    message = str(caught.value)
    assert "SIGKILL" in message and "victim" in message

    victim = next(m for m in client.status()["models"] if m["name"] == "victim")
    assert victim["state"] == "failed" and "SIGKILL" in victim["failure"]
    assert victim["leases"], "holders keep their lease so they can see what happened"
    assert client.chat("Say hi.", "bystander", max_tokens=5)
    with pytest.raises(ModelCrashed):
        client.chat("Still there?", "victim", max_tokens=5)

    reloaded = client.load("smollm2", name="victim")
    assert reloaded["model"]["state"] == "ready" and reloaded["model"]["worker_pid"] != victim_pid
    assert client.chat("Back again?", "victim", max_tokens=5)


def test_a_worker_that_dies_while_loading_fails_the_load_clearly(host, tmp_path):
    broken = tmp_path / "broken.gguf"
    # A whole GGUF header (version 3, a million tensors), so a worker does start on it; then noise.
    broken.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**6, 10**6) + os.urandom(4096))
    client = host.client()
    with pytest.raises(Exception) as caught:
        client.load(str(broken))
    assert "broken" in str(caught.value)
    assert client.status()["models"] == []
    assert host.worker_pids() == []
    client.load("smollm2")
    assert client.chat("ok?", "smollm2", max_tokens=3)


def test_worker_logs_are_kept_per_model_and_shown_by_the_cli(host):
    import subprocess
    import sys

    client = host.client()
    client.load("smollm2")
    log_file = client.status()["models"][0]["log_file"]
    assert log_file.startswith(str(host.runtime_dir)) and os.path.exists(log_file)
    assert "serving on" in client.logs("smollm2")
    cli = subprocess.run(
        [sys.executable, "-m", "llm_nb.cli", "logs", "smollm2", "-n", "5"],
        env=host.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and cli.stdout.strip()


def test_worker_socket_is_private(host):
    client = host.client()
    client.load("smollm2")
    sockets = list(host.runtime_dir.glob("*.sock"))
    assert sockets and all(os.stat(s).st_mode & 0o777 == 0o600 for s in sockets)
    assert os.stat(host.runtime_dir).st_mode & 0o777 == 0o700


def test_interrupted_stream_leaves_nothing_in_flight(host):
    client = host.client()
    client.load("smollm2")
    stream = client.chat("Write a very long essay about rivers.", "smollm2", stream=True, max_tokens=500, temperature=0)
    pieces = iter(stream)
    next(pieces)
    stream.close()
    closed = time.monotonic()
    wait_for(lambda: client.status()["models"][0]["in_flight"] == 0, 1.0, 0.02, "the generation to stop")
    assert time.monotonic() - closed < 1.0
    assert client.chat("ok?", "smollm2", max_tokens=3)
