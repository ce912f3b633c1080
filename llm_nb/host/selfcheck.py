"""``llm-nb selfcheck``: does the default model decode on this machine, in a worker and in-process?

The first thing CI runs, and what a user runs when every chat fails: a llama.cpp
build that crashes on this CPU (AMX, llama.cpp issue 20824) then names itself in
a few seconds, with llama.cpp's own line on what it uses here, instead of
showing up as hundreds of failed tests or a worker that dies at every load.

The worker check goes first and through the host's own worker code, so a crash
there is reported as a notebook would read it; the in-process check last, since
a crash there ends this process (the line printed before it says what ran).
"""

from __future__ import annotations

import asyncio
import dataclasses
import platform
import tempfile
import threading
import time
from pathlib import Path

from ..catalog import ModelSpec, resolve
from ..cpu import has_amx
from ..errors import LlmNbError
from .workers import WorkerProcess

PROMPT = "The capital of France is"


def _say(line: str) -> None:
    print(line, flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


async def _in_worker(spec: ModelSpec, tokens: int) -> tuple[str, int, float]:
    with tempfile.TemporaryDirectory(prefix="llm-nb-selfcheck-") as folder:
        worker = WorkerProcess(spec, Path(folder) / "w.sock", Path(folder) / "worker.log")
        try:
            await worker.open(lambda event: None)
            started = time.monotonic()
            text, produced = [], 0
            request = {"kind": "completion", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
            async for event in worker.generate(request):
                if "error" in event:
                    raise LlmNbError(str(event["error"].get("message")))
                text.append(event.get("text", ""))
                produced = event.get("completion_tokens", produced)
            return "".join(text), produced, time.monotonic() - started
        finally:
            await worker.stop(grace=5)


def _in_process(spec: ModelSpec, tokens: int) -> tuple[str, int, float]:
    from ..backends.base import Finished, GenerationRequest, TextDelta
    from ..backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(spec)
    backend.load(lambda message, fraction=None: None)
    started = time.monotonic()
    text, produced = [], 0
    request = GenerationRequest(kind="completion", prompt=PROMPT, max_tokens=tokens, temperature=0)
    for event in backend.generate(request, threading.Event()):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Finished):
            produced = event.completion_tokens
    backend.close()
    return "".join(text), produced, time.monotonic() - started


def run(model: str = "smollm2", tokens: int = 8, options: dict | None = None) -> int:
    """Print what this machine is and whether ``model`` decodes; 0 when it does both ways."""
    from ..backends.llamacpp import extra_buffers_default, system_info

    spec = resolve(model)
    if options:
        spec = dataclasses.replace(spec, options={**spec.options, **options})
    if spec.backend != "llamacpp":
        _say(f"llm-nb selfcheck: {model!r} is a {spec.backend} model; this check is for llama.cpp models")
        return 2
    _say(f"llm-nb selfcheck: {spec.name} ({spec.path})")
    auto = extra_buffers_default()
    chosen = spec.options.get("extra_buffers", "auto")
    _say(
        f"cpu: {_cpu_name()} · AMX: {'yes' if has_amx() else 'no'} · "
        f"llama.cpp extra buffers: {chosen} (auto here: {'on' if auto else 'off'})"
    )
    _say(f"llama.cpp: {system_info()}")
    for where, check in (
        ("worker", lambda: asyncio.run(_in_worker(spec, tokens))),
        ("in-process", lambda: _in_process(spec, tokens)),
    ):
        _say(f"{where}: loading and decoding {tokens} tokens ...")
        try:
            text, produced, seconds = check()
        except LlmNbError as exc:
            _say(f"{where}: FAILED: {exc}")
            return 1
        if produced < 1:
            _say(f"{where}: FAILED: the model produced no token")
            return 1
        _say(f"{where}: {text!r}, {produced} tokens in {seconds:.2f} s")
    _say("selfcheck passed")
    return 0
