"""Faults: the host or a model file goes away; clients get clear errors and recover."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from llm_nb.catalog import smollm2_path
from llm_nb.client import Client
from llm_nb.errors import HostUnavailable, LlmNbError, ModelNotFound

from .conftest import host_env, wait_for


def test_kill_9_of_the_host_mid_stream_gives_a_clear_error_and_the_next_call_starts_a_new_host(tmp_path, monkeypatch):
    env = host_env(tmp_path)
    for key in ("JUPYTER_RUNTIME_DIR", "LLM_NB_CONNECTION", "LLM_NB_CATALOG"):
        monkeypatch.setenv(key, env[key])
    client = Client()  # autostarts a host, as a kernel's client would
    first_pid = client.host_info()["pid"]
    client.load("smollm2")
    stream = client.chat("Tell me a long story about a forest.", "smollm2", stream=True, max_tokens=400, temperature=0)
    pieces = iter(stream)
    next(pieces)
    psutil.Process(first_pid).send_signal(signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(HostUnavailable) as caught:
        for _ in pieces:
            pass
    assert time.monotonic() - killed < 2
    assert f"host (pid {first_pid}) was killed by SIGKILL during this call" in str(caught.value)
    assert "not restarted inside the call" in str(caught.value)
    assert stream.text, "the partial reply is kept"
    assert client.locator.notices == [], "no host was started by the failing call"

    with pytest.raises(ModelNotFound):  # a new host, with nothing loaded yet
        client.chat("hello?", "smollm2", max_tokens=3)
    second_pid = client.host_info()["pid"]
    assert second_pid != first_pid
    assert client.locator.notices == [
        f"started a new host (pid {second_pid}): the previous one (pid {first_pid}) was killed by SIGKILL"
    ]
    client.load("smollm2")
    assert client.chat("hello again", "smollm2", max_tokens=3)
    psutil.Process(second_pid).terminate()
    wait_for(
        lambda: not psutil.pid_exists(second_pid) or psutil.Process(second_pid).status() == psutil.STATUS_ZOMBIE, 20
    )


def test_model_file_removed_under_a_loaded_model(host, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copy(smollm2_path(), copy)
    client = host.client()
    client.load(str(copy), name="copied")
    copy.unlink()
    # llama.cpp maps the file: the loaded model keeps its pages and serves on.
    assert client.chat("still here?", "copied", max_tokens=4)
    assert client.status()["models"][0]["state"] == "ready"
    client.unload("copied", force=True)
    with pytest.raises(ModelNotFound) as caught:
        client.load(str(copy), name="copied")
    assert "copy.gguf" in str(caught.value)
    client.load("smollm2")
    assert client.chat("others are fine", "smollm2", max_tokens=3)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_a_deployment_fails_that_deploy_only(host, tmp_path):
    from .test_deployments import ECHO, make_deployment

    client = host.client()
    client.load("smollm2")
    steady = client.deploy("steady", make_deployment(tmp_path / "steady"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "weights.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    target = tmp_path / "target"
    target.mkdir()
    # The copy goes through weights.bin.part; there, /dev/full answers every write with ENOSPC,
    # as a full disk does.
    (target / "weights.bin.part").symlink_to("/dev/full")
    folder = make_deployment(
        tmp_path / "big", ECHO, {"download_files_from": str(data), "download_files_to": str(target)}
    )
    with pytest.raises(LlmNbError) as caught:
        client.deploy("big", folder)
    assert caught.value.code == "disk_full"
    assert str(target) in str(caught.value) and "download_files_to" in str(caught.value)
    assert list(target.iterdir()) == [], "the partial file is removed"
    # Nothing else is disturbed: the host, the loaded model and the other deployment serve on.
    assert [d["name"] for d in client.deployments()] == ["steady"]
    assert client.chat("still here?", "smollm2", max_tokens=3)
    reply = requests.post(
        f"{host.url}/models/steady/", json={"x": 1}, headers={"Authorization": f"Bearer {host.key}"}, timeout=30
    )
    assert reply.status_code == 200 and reply.json()["version"] == steady["deployment"]["version"]
    # With room again, the same deploy goes through.
    client.deploy("big", folder)
    assert (target / "weights.bin").stat().st_size == 2 * 1024 * 1024
