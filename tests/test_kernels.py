"""Real IPython kernels (jupyter_client) sharing one host: one copy, leases, attach time, interrupt, kernel death."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from .conftest import RunningHost, start_host, wait_for

N_KERNELS = 4
KERNEL_READY_S = 90


class Kernel:
    """A kernel started with ``jupyter_client``, and a blocking client to it."""

    def __init__(self, env: dict, name: str):
        self.name = name
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env)
        self.client = self.manager.client()
        self.client.start_channels()

    def ready(self) -> Kernel:
        self.client.wait_for_ready(timeout=KERNEL_READY_S)
        return self

    @property
    def pid(self) -> int:
        return self.manager.provisioner.pid

    def run(self, code: str, timeout: float = 120) -> tuple[dict, list[dict]]:
        """Execute ``code``; the reply's content and the iopub messages it caused."""
        messages: list[dict] = []
        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=messages.append)
        return reply["content"], messages

    def stop(self) -> None:
        try:
            self.client.stop_channels()
        finally:
            if self.manager.has_kernel:
                self.manager.shutdown_kernel(now=True)


def text_of(messages: list[dict]) -> str:
    """Everything a cell showed, as text."""
    parts = []
    for msg in messages:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            parts.append(content["text"])
        elif msg["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            parts.append(content["data"].get("text/plain", ""))
        elif msg["msg_type"] == "error":
            parts.extend(content["traceback"])
    return "\n".join(parts)


@pytest.fixture(scope="module")
def kernel_host(tmp_path_factory) -> Iterator[RunningHost]:
    host = start_host(tmp_path_factory.mktemp("kernels-host"))
    yield host
    host.stop()


@pytest.fixture(scope="module")
def kernels(kernel_host) -> Iterator[list[Kernel]]:
    """Four kernels, each a notebook of its own, all pointed at the one host."""
    started: list[Kernel] = []
    try:
        for i in range(N_KERNELS):
            env = dict(kernel_host.env, JPY_SESSION_NAME=f"notebook-{i}.ipynb")
            env.pop("LLM_NB_CLIENT_NAME", None)
            started.append(Kernel(env, f"notebook-{i}.ipynb"))
        for kernel in started:
            kernel.ready()
            reply, _ = kernel.run("%load_ext llm_nb")
            assert reply["status"] == "ok"
        yield started
    finally:
        for kernel in started:
            kernel.stop()


def smollm2(host: RunningHost) -> dict:
    models = host.client().status()["models"]
    assert [m["name"] for m in models] == ["smollm2"], models
    return models[0]


def test_four_kernels_load_one_copy_with_four_leases(kernels, kernel_host):
    reply, messages = kernels[0].run("%llm_load smollm2")
    assert reply["status"] == "ok", text_of(messages)
    assert text_of(messages).splitlines()[-1].startswith("smollm2 · llamacpp · cpu · ")
    one_copy = smollm2(kernel_host)["memory_bytes"]
    for i, kernel in enumerate(kernels[1:], start=1):
        reply, messages = kernel.run("%llm_load smollm2")
        shown = text_of(messages)
        assert reply["status"] == "ok", shown
        assert f"already loaded for {i} other notebook" in shown, shown
    model = smollm2(kernel_host)
    assert sorted(lease["name"] for lease in model["leases"]) == [f"notebook-{i}.ipynb" for i in range(N_KERNELS)]
    assert all(lease["client"].startswith("kernel:") for lease in model["leases"])
    assert len(kernel_host.worker_pids()) == 1  # one worker process: one copy of the weights
    assert model["memory_bytes"] <= 1.1 * one_copy, (model["memory_bytes"], one_copy)


def test_attach_takes_milliseconds(kernels):
    code = (
        "import time, statistics\n"
        "ip = get_ipython(); times = []\n"
        "for _ in range(15):\n"
        "    t = time.perf_counter(); ip.run_line_magic('llm_load', 'smollm2'); times.append(time.perf_counter() - t)\n"
        "print('ATTACH_MS', 1000 * statistics.median(times))\n"
    )
    reply, messages = kernels[1].run(code)
    assert reply["status"] == "ok", text_of(messages)
    median_ms = float(text_of(messages).split("ATTACH_MS")[1].split()[0])
    print(f"median %llm_load attach: {median_ms:.1f} ms")
    # The aim is <= 50 ms (benchmarks/bench_attach.py); this bound only catches a load instead of an attach
    # on a 2-core machine that other tests share.
    assert median_ms < 500, median_ms


def test_panel_in_a_kernel_shows_a_widget_that_polls_until_closed(kernels):
    kernel = kernels[0]
    reply, messages = kernel.run("%llm_panel --interval 0.3")
    assert reply["status"] == "ok", text_of(messages)
    views = [m for m in messages if m["msg_type"] == "display_data"]
    assert "application/vnd.jupyter.widget-view+json" in views[0]["content"]["data"]
    # The poller thread updates the widgets over comm messages while the kernel is idle.
    deadline = time.monotonic() + 30
    updates = 0
    while updates < 3:
        assert time.monotonic() < deadline, "the panel sent no status updates"
        msg = kernel.client.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "comm_msg" and "host pid" in str(msg["content"]["data"].get("state", {})):
            updates += 1  # the header carries the time of the last poll
    reply, messages = kernel.run(
        "from llm_nb.widgets import _live_panels\n"
        "(panel,) = list(_live_panels); panel.close(); panel._poller.join(5); print(panel.polling)"
    )
    assert text_of(messages).strip() == "False"


def test_interrupt_during_chat_leaves_nothing_in_flight(kernels, kernel_host):
    kernel = kernels[2]
    observer = kernel_host.client()
    msg_id = kernel.client.execute(
        "%%llm_chat --max-tokens 2000 --temperature 0\nWrite a very long essay about rivers."
    )
    # Wait for the reply's display to be updated: tokens are streaming.
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "no streaming update from the kernel"
        msg = kernel.client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "update_display_data":
            break
    assert smollm2(kernel_host)["in_flight"] == 1
    kernel.manager.interrupt_kernel()
    interrupted = time.monotonic()
    wait_for(lambda: observer.status()["models"][0]["in_flight"] == 0, 1.0, 0.02, "the host to cancel")
    cancel_s = time.monotonic() - interrupted
    print(f"in flight on the host 0 after {cancel_s * 1000:.0f} ms")
    reply = kernel.client.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "ChatInterrupted"
    # The kernel lives on and keeps the partial reply in the conversation.
    reply, messages = kernel.run(
        "import llm_nb; last = llm_nb.history()[-1]; print(last['role'], len(last['content']))"
    )
    role, length = text_of(messages).split()
    assert reply["status"] == "ok" and role == "assistant" and int(length) > 0


def test_killed_kernel_lease_is_gone_within_10_s(kernels, kernel_host):
    victim = kernels[3]
    before = {lease["name"] for lease in smollm2(kernel_host)["leases"]}
    assert victim.name in before
    os.kill(victim.pid, 9)
    killed = time.monotonic()
    wait_for(
        lambda: victim.name not in {lease["name"] for lease in smollm2(kernel_host)["leases"]},
        10,
        0.1,
        "the dead kernel's lease to go",
    )
    print(f"lease released {time.monotonic() - killed:.1f} s after kill -9")
    assert {lease["name"] for lease in smollm2(kernel_host)["leases"]} == before - {victim.name}


def test_kernel_restarts_a_dead_host_on_the_next_magic(tmp_path: Path):
    """A host killed under a kernel: the next magic starts a new one and loads the model again."""
    host = start_host(tmp_path)
    kernel = Kernel(dict(host.env, JPY_SESSION_NAME="restart.ipynb"), "restart.ipynb").ready()
    restarted = None
    try:
        reply, _ = kernel.run("%load_ext llm_nb\n%llm_load")
        assert reply["status"] == "ok"
        host.process.kill()
        host.process.wait(10)
        reply, messages = kernel.run("%%llm_chat --max-tokens 8 --temperature 0 -o said\nSay hi.")
        assert reply["status"] == "ok", text_of(messages)
        restarted = host.info["pid"]
        assert restarted != host.process.pid
        said = [line for line in text_of(messages).splitlines() if "llm-nb:" in line]
        assert said == [
            f"llm-nb: started a new host (pid {restarted}): the previous one (pid {host.process.pid}) is gone "
            "(how it ended was not recorded)"
        ], text_of(messages)
        model = smollm2(host)
        assert [lease["name"] for lease in model["leases"]] == ["restart.ipynb"]
    finally:
        kernel.stop()
        if restarted:
            host.client().shutdown()
            from llm_nb.connection import pid_alive

            wait_for(lambda: not pid_alive(restarted), 20, 0.1, "the restarted host to stop")
