"""A model worker: one loaded model in a process of its own.

The host starts ``python -m llm_nb.worker --socket PATH --parent-pid PID``
with a pipe on stdin and talks to it over a Unix domain socket inside the
host's 0700 runtime folder. The protocol is small and internal:

=================  ==========================================================
``GET  /info``     state (``starting``, ``loading``, ``ready``, ``failed``),
                   backend facts, measured memory
``POST /load``     body: the ``ModelSpec``; answers newline-delimited JSON
                   progress events, ending in ``ready`` or ``error``
``POST /generate`` body: a ``GenerationRequest``; answers NDJSON events
                   ``{"text": ...}`` then ``{"finish_reason", "prompt_tokens",
                   "completion_tokens"}``; closing the connection cancels
                   the generation at its next token
``POST /embed``    ``{"input": [...]}`` -> ``{"data": [[...]], "prompt_tokens"}``
``POST /classify`` ``{"input": [...], "parameters": {...}}``
``POST /tokenize`` ``{"text": ...}`` -> ``{"tokens": [...]}``
``POST /predict``  a deployment's ``{"payload": ...}`` -> ``{"result": ...}``
``POST /restore``  a deployment version puts back what a failed successor changed
``POST /shutdown`` answers, then the process ends (``{"replaced": true}``: a
                   newer version took over what the two share)
=================  ==========================================================

Errors are the OpenAI-shaped JSON of ``llm_nb.errors`` with their status, so
the host can pass them on unchanged.

The worker never outlives the host: ``PR_SET_PDEATHSIG`` asks Linux to kill
it when the host dies, and a thread waits for EOF on the stdin pipe that only
the host holds, which covers every other way the host can go.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from .catalog import ModelSpec
from .config import worker_stream_interval
from .errors import InvalidRequest, LlmNbError
from .processes import die_with_parent

log = logging.getLogger("llm_nb.worker")
_END = object()
STREAM_INTERVAL_S = worker_stream_interval()


def _error_response(exc: BaseException) -> web.Response:
    if not isinstance(exc, LlmNbError):
        log.exception("request failed", exc_info=exc)
        exc = LlmNbError(f"the model's backend failed: {type(exc).__name__}: {exc}")
    return web.json_response(exc.to_json(), status=exc.status)


def _text_line(text: list[str], logprobs: list[dict] | None) -> bytes:
    """Text deltas coalesced into one line, their tokens' logprobs (when asked) beside."""
    line: dict = {"text": "".join(text)}
    if logprobs is not None:
        line["logprobs"] = logprobs
    return _ndjson(line)


def _ndjson(event: dict) -> bytes:
    return (json.dumps(event, ensure_ascii=False) + "\n").encode()


class Worker:
    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid
        self.state = "starting"
        self.spec: ModelSpec | None = None
        self.backend = None
        self.loading_backend = None
        self.error: dict | None = None
        self.progress: dict[str, Any] = {}
        self.load_seconds: float | None = None
        self._load_events: list[dict] = []
        self._load_changed: asyncio.Condition | None = None
        self._load_task: asyncio.Task | None = None
        self.shutdown_event = asyncio.Event()

    # --- load --------------------------------------------------------------
    def _record(self, event: dict, loop: asyncio.AbstractEventLoop) -> None:
        async def notify() -> None:
            self._load_events.append(event)
            async with self._load_changed:
                self._load_changed.notify_all()

        asyncio.run_coroutine_threadsafe(notify(), loop)

    async def _load(self, spec: ModelSpec) -> None:
        from .backends.base import backend_class

        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def progress(message: str, fraction: float | None = None, **facts: Any) -> None:
            # facts: what a backend knows beside the message (a Ray deploy: why its replicas wait)
            self.progress = {"message": message, "fraction": fraction, "elapsed": time.monotonic() - started, **facts}
            self._record({"event": "progress", **self.progress}, loop)

        def load_blocking():
            backend = backend_class(spec.backend, spec.task)(spec)
            self.loading_backend = backend  # a shutdown during the load closes it (a Ray deploy removes its app)
            backend.load(progress)
            return backend

        self.state = "loading"
        progress(f"loading {spec.name} with {spec.backend}", 0.0)
        try:
            self.backend = await asyncio.to_thread(load_blocking)
        except BaseException as exc:  # the error goes to the host, the worker stays to answer it
            self.state = "failed"
            if not isinstance(exc, LlmNbError):
                log.exception("load failed")
                exc = LlmNbError(f"loading {spec.name!r} failed: {type(exc).__name__}: {exc}", code="load_failed")
            self.error = exc.to_json()
            self._record({"event": "error", **self.error}, loop)
            return
        self.load_seconds = time.monotonic() - started
        self.state = "ready"
        self._record({"event": "ready", "info": self.info()}, loop)

    async def handle_load(self, request: web.Request) -> web.StreamResponse:
        if self._load_task is None:
            self.spec = ModelSpec.from_json(await request.json())
            self._load_changed = asyncio.Condition()
            self._load_task = asyncio.create_task(self._load(self.spec))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        sent = 0
        while True:
            async with self._load_changed:
                await self._load_changed.wait_for(lambda n=sent: len(self._load_events) > n)
            for event in self._load_events[sent:]:
                await response.write(_ndjson(event))
                sent += 1
                if event["event"] in ("ready", "error"):
                    await response.write_eof()
                    return response

    # --- info --------------------------------------------------------------
    def info(self) -> dict:
        import psutil

        info = {
            "state": self.state,
            "pid": os.getpid(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "progress": self.progress,
            "load_seconds": self.load_seconds,
            "error": self.error,
            "parallel": getattr(self.backend, "parallel", 1),
        }
        if self.backend is not None:
            info.update(self.backend.info())
        return info

    async def handle_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info())

    def _ready_backend(self):
        if self.backend is None:
            raise LlmNbError("the model is not loaded in this worker yet", code="model_loading", status=503)
        return self.backend

    # --- generation ----------------------------------------------------------
    async def _events_from_thread(
        self, produce: Callable[[threading.Event], Iterator]
    ) -> tuple[asyncio.Queue, threading.Event]:
        """Run a blocking iterator in a thread; its items arrive on an asyncio queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def run() -> None:
            try:
                for item in produce(cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                    if cancelled.is_set():
                        break
            except BaseException as exc:  # handed to the request, which answers it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        threading.Thread(target=run, name="generate", daemon=True).start()
        return queue, cancelled

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        from .backends.base import Finished, GenerationRequest, TextDelta

        backend = self._ready_backend()
        try:
            gen_request = GenerationRequest.from_json(await request.json())
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad generation request: {exc}") from exc
        queue, cancelled = await self._events_from_thread(lambda c: backend.generate(gen_request, c))
        response: web.StreamResponse | None = None
        try:
            while True:
                item = await queue.get()
                batch = [item]
                while not queue.empty():  # coalesce what is ready into one write
                    batch.append(queue.get_nowait())
                text: list[str] = []
                logprobs: list[dict] | None = None
                lines: list[bytes] = []
                done = False

                for event in batch:
                    if isinstance(event, TextDelta):
                        text.append(event.text)
                        if event.logprobs is not None:
                            logprobs = (logprobs or []) + event.logprobs
                        continue
                    if text:
                        lines.append(_text_line(text, logprobs))
                        text, logprobs = [], None
                    if isinstance(event, Finished):
                        lines.append(_ndjson(event.__dict__))
                    elif isinstance(event, BaseException):
                        if response is None:
                            return _error_response(event)
                        err = event if isinstance(event, LlmNbError) else LlmNbError(f"generation failed: {event}")
                        lines.append(_ndjson(err.to_json()))
                    elif event is _END:
                        done = True
                if text:
                    lines.append(_text_line(text, logprobs))
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                    await response.prepare(request)
                if lines:
                    await response.write(b"".join(lines))
                if done:
                    await response.write_eof()
                    return response
                # Let tokens gather for a moment: one write per interval instead of one per
                # token keeps the hop's CPU cost (three processes per write) off the model's
                # cores. The first token still goes out at once.
                if STREAM_INTERVAL_S > 0:
                    await asyncio.sleep(STREAM_INTERVAL_S)
        finally:
            cancelled.set()

    async def handle_embed(self, request: web.Request) -> web.Response:
        backend = self._ready_backend()
        body = await request.json()
        vectors, tokens = await asyncio.to_thread(backend.embed, list(body["input"]))
        return web.json_response({"data": vectors, "prompt_tokens": tokens})

    async def handle_classify(self, request: web.Request) -> web.Response:
        backend = self._ready_backend()
        body = await request.json()
        result = await asyncio.to_thread(backend.classify, list(body["input"]), dict(body.get("parameters") or {}))
        return web.json_response(result)

    async def handle_tokenize(self, request: web.Request) -> web.Response:
        backend = self._ready_backend()
        body = await request.json()
        tokens = await asyncio.to_thread(backend.tokenize, str(body["text"]))
        return web.json_response({"tokens": tokens})

    async def handle_predict(self, request: web.Request) -> web.Response:
        """A deployment's request: ``{"payload": ...}`` -> ``{"result": ...}``."""
        backend = self._ready_backend()
        predict = getattr(backend, "predict", None)
        if predict is None:
            raise InvalidRequest(f"{self.spec.name!r} is a model, not a deployment: it has no predict()")
        body = await request.json()
        return web.json_response({"result": await predict(body.get("payload"), **dict(body.get("kwargs") or {}))})

    async def handle_restore(self, request: web.Request) -> web.Response:
        """A deployment whose successor failed part way through replacing it puts itself back (Ray)."""
        restore = getattr(self._ready_backend(), "restore", None)
        if restore is None:
            raise InvalidRequest(f"{self.spec.name!r} shares nothing with other versions: nothing to restore")
        await asyncio.to_thread(restore)
        return web.json_response({"ok": True})

    async def handle_shutdown(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        if body.get("replaced") and self.backend is not None:
            # A newer version of this deployment serves now: what they share (a Ray application) stays.
            self.backend.replaced = True
        self.shutdown_event.set()
        return web.json_response({"ok": True})

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes an answer; the worker lives on
            return _error_response(exc)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.errors], client_max_size=256 * 1024 * 1024)
        app.router.add_get("/info", self.handle_info)
        app.router.add_post("/load", self.handle_load)
        app.router.add_post("/generate", self.handle_generate)
        app.router.add_post("/embed", self.handle_embed)
        app.router.add_post("/classify", self.handle_classify)
        app.router.add_post("/tokenize", self.handle_tokenize)
        app.router.add_post("/predict", self.handle_predict)
        app.router.add_post("/restore", self.handle_restore)
        app.router.add_post("/shutdown", self.handle_shutdown)
        return app


async def serve(socket_path: str, parent_pid: int) -> None:
    worker = Worker(parent_pid)
    # handler_cancellation: a host that closes the stream cancels the handler at
    # once, which sets the generation's cancel flag.
    runner = web.AppRunner(worker.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, socket_path)
    await site.start()
    os.chmod(socket_path, 0o600)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.shutdown_event.set)
    log.info("worker %d serving on %s", os.getpid(), socket_path)
    await worker.shutdown_event.wait()
    await asyncio.sleep(0.05)  # let the shutdown answer go out
    # A load still under way is closed too: a Ray deploy cancelled while it waits removes its application.
    backend = worker.backend or (worker.loading_backend if worker.state == "loading" else None)
    if backend is not None:
        try:
            backend.close()
        except Exception:
            log.exception("backend close failed")
    # Ending the process is what gives the memory back; skip slow teardown.
    logging.shutdown()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llm_nb.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # A segfault in a backend's native code then leaves the Python stack that led there (the
    # faulting thread's: a generation's) in the worker's log, whose end the host quotes.
    faulthandler.enable(sys.stderr, all_threads=False)
    die_with_parent(args.parent_pid)
    asyncio.run(serve(args.socket, args.parent_pid))


if __name__ == "__main__":
    main()
