"""Soak: 200 load/attach/unload cycles over both backends with chats running beside them.

No leaked leases, threads or file handles in the host; its RSS drifts by less than 5 %.
"""

from __future__ import annotations

import threading

import psutil
import pytest

from llm_nb.client import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

CYCLES = 200
REAL_UNLOAD_EVERY = 20  # every 20th cycle ends the worker (keep_alive 0); the rest release a lease


def host_resources(pid: int) -> dict:
    proc = psutil.Process(pid)
    return {"rss": proc.memory_info().rss, "threads": proc.num_threads(), "fds": proc.num_fds()}


def test_200_load_attach_unload_cycles_leak_nothing(host, tmp_path):
    pytest.importorskip("transformers")
    from .tiny_models import tiny_llama

    hf_folder = tiny_llama(tmp_path / "tiny-llama")
    models = [
        {"model": "smollm2", "name": "cycle-llamacpp"},
        {"model": str(hf_folder), "name": "cycle-hf", "backend": "transformers"},
    ]
    client = host.client()
    client.load("smollm2", name="steady", keep_alive=-1)
    other = Client(host.connection_file, autostart=False)
    other.identity = dict(other.identity, id="soak-other", name="other.ipynb")

    stop = threading.Event()
    chat_errors: list[BaseException] = []
    chats = [0]

    def chat_forever() -> None:
        chatter = host.client()
        while not stop.is_set():
            try:
                chatter.chat("Say one word.", "steady", max_tokens=4)
                chats[0] += 1
            except BaseException as exc:  # recorded and asserted on below
                chat_errors.append(exc)
                return

    background = threading.Thread(target=chat_forever, daemon=True)
    background.start()
    try:
        # Warm-up: the host's one-time imports and caches are not leaks.
        for spec in models:
            client.load(**spec, keep_alive=0)
            client.chat("hi", spec["name"], max_tokens=2)
            client.unload(spec["name"])
        before = host_resources(host.process.pid)

        for cycle in range(CYCLES):
            spec = models[cycle % 2]
            keep_alive = 0 if cycle % REAL_UNLOAD_EVERY in (0, 1) else 60
            first = client.load(**spec, keep_alive=keep_alive)
            second = other.load(**spec)
            assert second["attached"] is True
            assert first["model"]["worker_pid"] == second["model"]["worker_pid"]
            if cycle % 10 < 2:
                assert other.chat("Hello", spec["name"], max_tokens=3) is not None
            other.unload(spec["name"])
            result = client.unload(spec["name"])
            assert result["unloaded"] is (keep_alive == 0)
        for spec in models:
            client.unload(spec["name"], force=True)
    finally:
        stop.set()
        background.join(30)

    assert not chat_errors, chat_errors
    assert chats[0] > 10
    status = client.status()
    assert [m["name"] for m in status["models"]] == ["steady"]
    assert [lease["client"] for lease in status["models"][0]["leases"]] == [client.identity["id"]]
    after = host_resources(host.process.pid)
    assert after["threads"] <= before["threads"] + 2, (before, after)
    assert after["fds"] <= before["fds"] + 5, (before, after)
    drift = (after["rss"] - before["rss"]) / before["rss"]
    assert drift < 0.05, f"host RSS drifted {drift:.1%} ({before['rss'] >> 20} -> {after['rss'] >> 20} MiB)"
    assert len(host.worker_pids()) == 1
