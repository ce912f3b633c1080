"""vLLM as a model's engine: its own OpenAI server (``vllm serve``), a worker the host starts and ends.

vLLM runs from an environment of its own (``vllm_env.find_vllm``).

Each model is one ``vllm serve`` on a loopback port with a key of its own,
under ``llm_nb.keeper`` (which ends vLLM's engine processes with it and with
the host). The host relays ``/v1`` to it (``RemoteEngine``: the relay and the
event interface), so vLLM's own continuous batching, prefix caching, guided
decoding and tool parsers answer; everything above the runner (leases, budget,
keep-alive, LRU, status, fail-fast) is as for any worker.

The budget hands vLLM exactly what it admitted (``memory.vllm_plan``): the KV
cache as ``--kv-cache-memory-bytes`` (vLLM pre-allocates it), and on a GPU the
admitted share as ``--gpu-memory-utilization``. A GGUF is converted once into
an HF folder in the user cache (``gguf_to_hf``, run by vLLM's own python).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from .. import tool_format
from ..catalog import ModelSpec
from ..config import format_bytes
from ..errors import InvalidRequest, LlmNbError, ModelFailed
from ..processes import describe_exit
from . import memory
from .remote import RemoteEngine
from .vllm_env import chat_template, converted_folder, require_vllm, tool_parser_for, vllm_python
from .vllm_log import error_lines, read_new, stage_of
from .workers import WatchedProcess, tail

log = logging.getLogger("llm_nb.host.vllm")

START_TIMEOUT_S = 900.0  # weights, torch.compile and CUDA graphs: minutes on a first start
CONVERT_TIMEOUT_S = 1800.0
PROGRESS_EVERY_S = 5.0  # a start that says nothing new still says how long it has taken
DEFAULT_MAX_SEQS = {"ram": 32, "gpu": 256}
GPU_HEADROOM = 0.02  # vLLM's check of free memory against its share: rounding must not make it refuse


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmEngine(WatchedProcess, RemoteEngine):
    """One ``vllm serve`` for one model: a worker process of the host, reached over loopback HTTP."""

    what = "the vLLM server"

    def __init__(
        self,
        spec: ModelSpec,
        log_path: Path,
        on_exit: Callable[[WatchedProcess], Awaitable[None]] | None = None,
    ):
        self.command = require_vllm()
        self.model_spec = spec
        self.plan = memory.vllm_plan(spec)
        self.port = free_port()
        self.max_seqs = int(spec.options.get("max_num_seqs") or DEFAULT_MAX_SEQS[self.plan["kind"]])
        local = dataclasses.replace(
            spec,
            backend="remote",
            url=f"http://127.0.0.1:{self.port}/v1",
            remote_model=spec.name,  # served under this host's name: the relay renames nothing
            api_key_env=None,
            options={"max_concurrency": self.max_seqs, "timeout": float(spec.options.get("timeout", 600))},
        )
        super().__init__(local, api_key=secrets.token_urlsafe(24))
        self.spec = spec
        self.log_path = log_path
        self.on_exit = on_exit
        self._no_process_yet()
        self.folder: Path | None = None
        self.converted_from: str | None = None
        self.tool_parser: str | None = None
        self.template_has_tools = False
        self.version: str | None = None

    # --- what the runner interface asks ---------------------------------------
    @property
    def where(self) -> str:
        return f"the vLLM server of {self.spec.name!r}"

    async def open(self, on_progress: Callable[[dict], None]) -> dict:
        started = time.monotonic()

        def progress(message: str, fraction: float | None = None) -> None:
            on_progress({"message": message, "fraction": fraction, "elapsed": round(time.monotonic() - started, 1)})

        self.folder = await self._model_folder(progress)
        template = await asyncio.to_thread(chat_template, self.folder)
        self.template_has_tools = "tools" in template
        chosen = self.spec.options.get("tool_call_parser")
        self.tool_parser = (
            None if chosen in ("none", "", False) else (str(chosen) if chosen else tool_parser_for(template))
        )
        await self._start(progress, started)
        self.healthy, self.health_error = True, None
        return await self.info()

    async def info(self) -> dict[str, Any]:
        device = "cuda:0" if self.plan["kind"] == "gpu" else "cpu"
        return {
            "backend": "vllm",
            "device": device,
            "parallel": self.max_seqs,
            "vllm_version": self.version,
            "max_model_len": self.plan["max_model_len"],
            "kv_cache_bytes": self.plan["kv_cache_bytes"],
            "gpu_memory_utilization": self._gpu_share(),
            "prefix_caching": True,
            "tool_call_parser": self.tool_parser,
            "model_folder": str(self.folder) if self.folder else None,
            "converted_from": self.converted_from,
            "healthy": self.healthy,
            "health_error": self.health_error,
        }

    async def refresh_health(self) -> bool:
        """Nothing to poll: the process watch reports a vLLM that dies at once."""
        return False

    def relays(self, parsed, passthrough: bool = True) -> bool:
        """vLLM answers every request itself where its chunks pass through (the plain ones too: its own
        server's speed), but for tools where no tool parser of vLLM's fits the model's template: those
        take the host's own tool format, grammar and parser (``generate``), as on the local backends."""
        if parsed.model_fields_set & {"tools", "tool_choice"} and self.tool_parser is None:
            return False
        return passthrough or super().relays(parsed)

    async def classify(self, inputs: list, parameters: dict) -> dict:
        raise InvalidRequest(f"{self.spec.name!r} is served by vLLM, which answers /v1 here, not /v2 infer")

    def relay_body(self, body: dict) -> dict:
        return dict(body, model=self.remote_model)

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        if request.get("tools") and request.get("messages") is not None:
            request = dict(
                request,
                messages=tool_format.template_messages(
                    request["messages"], request["tools"], tools_supported=self.template_has_tools
                ),
            )
        async for event in super().generate(request):
            yield event

    def request_extras(self, request: dict) -> dict:
        """The host's llguidance grammar (tools, formats) goes to vLLM's guidance backend as it is."""
        return {"structured_outputs": {"grammar": request["grammar"]}} if request.get("grammar") else {}

    async def lost(self, exc: BaseException) -> LlmNbError:
        """A broken connection to a vLLM that died is its crash, said as for any worker."""
        if self.stopping:
            return LlmNbError(
                f"model {self.spec.name!r} was unloaded while the request ran", code="model_unloaded", status=503
            )
        try:
            await asyncio.wait_for(self.exited.wait(), 5.0)  # the keeper ends the rest first: about a second
        except TimeoutError:
            return await super().lost(exc)
        return self.crashed_error()

    # --- the model folder --------------------------------------------------------
    async def _model_folder(self, progress: Callable[..., None]) -> Path:
        source = Path(self.spec.path or "")
        if source.is_dir():
            return source
        folder = await asyncio.to_thread(converted_folder, source)
        if folder.is_dir():
            self.converted_from = str(source)
            progress(f"using the HF folder converted from {source.name} before ({folder})", 0.05)
            return folder
        progress(f"converting {source.name} to an HF folder for vLLM (once; kept in {folder.parent})", 0.02)
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        converter = Path(__file__).with_name("gguf_to_hf.py")
        with open(self.log_path, "ab", buffering=0) as log_file:
            log_file.write(f"llm-nb: converting {source} into {folder}\n".encode())
            # -I: the script's folder (llm_nb/host, with its own http.py) must not shadow the stdlib.
            convert = await asyncio.create_subprocess_exec(
                vllm_python(self.command),
                "-I",
                str(converter),
                str(source),
                str(folder),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=self._env(),
            )
            assert convert.stdout is not None
            try:
                async with asyncio.timeout(CONVERT_TIMEOUT_S):
                    async for raw in convert.stdout:
                        log_file.write(raw)
                        if stage := stage_of(raw.decode(errors="replace")):
                            progress(stage[0], stage[1])
                    await convert.wait()
            except TimeoutError:
                convert.kill()
                await convert.wait()
        if convert.returncode != 0 or not folder.is_dir():
            raise ModelFailed(
                f"converting {source.name} for vLLM failed ({describe_exit(convert.returncode)}); its last lines "
                f"({self.log_path}):\n{error_lines(tail(self.log_path, 60))}"
            )
        self.converted_from = str(source)
        return folder

    # --- the process -------------------------------------------------------------
    def _gpu_share(self) -> float | None:
        if self.plan["kind"] != "gpu":
            return None
        gpu = memory.gpu_info()
        need = self.plan["weights_bytes"] + self.plan["kv_cache_bytes"] + self.plan["overhead_bytes"]
        return round(min(0.95, need / gpu.total + GPU_HEADROOM), 3) if gpu else None

    def serve_args(self) -> list[str]:
        assert self.folder is not None
        args = [
            "serve",
            str(self.folder),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            self.spec.name,
            "--max-model-len",
            str(self.plan["max_model_len"]),
            "--kv-cache-memory-bytes",
            str(self.plan["kv_cache_bytes"]),
            "--max-num-seqs",
            str(self.max_seqs),
            "--enable-prefix-caching",
            "--disable-uvicorn-access-log",
            # llguidance, as in the host's own backends: the host's grammars (tools) compile as they are.
            "--structured-outputs-config",
            '{"backend": "guidance"}',
        ]
        if (share := self._gpu_share()) is not None:
            args += ["--gpu-memory-utilization", str(share)]
        if self.spec.options.get("dtype"):
            args += ["--dtype", str(self.spec.options["dtype"])]
        if self.tool_parser:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_parser]
        return args + shlex.split(str(self.spec.options.get("args") or ""))

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        # No hub (the folder is local), no usage reports, and logs that say where each line came from.
        env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        # The key in the environment, not on the command line, which every user of the machine can read.
        env["VLLM_API_KEY"] = self._api_key or ""
        if self.plan["kind"] == "ram":
            env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        return env

    async def _start(self, progress: Callable[..., None], started: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = self.serve_args()
        with open(self.log_path, "ab", buffering=0) as log_file:
            log_file.write(f"llm-nb: starting vllm {' '.join(args)}\n".encode())
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llm_nb.keeper",
                "--parent-pid",
                str(os.getpid()),
                "--",
                *self.command,
                *args,
                stdin=asyncio.subprocess.PIPE,  # never written: EOF tells the keeper the host is gone
                stdout=log_file,
                stderr=log_file,
                env=self._env(),
                start_new_session=True,  # one process group: the last resort ends all of it
            )
        self._watch_exit()
        progress(
            f"starting vLLM ({format_bytes(self.plan['kv_cache_bytes'])} KV cache, "
            f"{self.plan['max_model_len']} tokens a sequence)",
            0.1,
        )
        timeout = float(self.spec.options.get("start_timeout") or START_TIMEOUT_S)
        last_stage, last_said = "starting", time.monotonic()
        while True:
            offset, lines = read_new(self.log_path, offset)
            for line in lines:
                if stage := stage_of(line):
                    last_stage, last_said = stage[0], time.monotonic()
                    progress(*stage)
            if self.exited.is_set():
                raise ModelFailed(
                    f"vLLM did not start for {self.spec.name!r}: it {describe_exit(self.returncode)}; its last "
                    f"lines ({self.log_path}):\n{error_lines(tail(self.log_path, 80))}"
                )
            if await self._ready():
                break
            if time.monotonic() - started > timeout:
                await self.kill()
                raise ModelFailed(
                    f"vLLM did not answer within {timeout:.0f} s for {self.spec.name!r}; see {self.log_path}"
                )
            if time.monotonic() - last_said >= PROGRESS_EVERY_S:
                last_said = time.monotonic()
                progress(f"{last_stage} (vLLM is still starting)")
            await asyncio.sleep(0.5)
        progress("vLLM is ready", 1.0)
        await self.check()
        self.version = await self._version()

    async def _ready(self) -> bool:
        try:
            async with self.session.get(
                f"http://127.0.0.1:{self.port}/health", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _version(self) -> str | None:
        try:
            async with self.session.get(
                f"http://127.0.0.1:{self.port}/version", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                return (await response.json(content_type=None)).get("version")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError):
            return None

    def _ended_by_itself(self) -> None:
        # A keeper killed outright (the OOM killer) ends nothing below it: its process group does.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the keeper (it ends vLLM's tree); the whole process group is SIGKILLed if it lingers."""
        self.stopping = True
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.terminate()
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.exited.wait(), grace + 12.0)  # the keeper's own grace is 10 s
            except TimeoutError:
                log.warning("vLLM of %s did not end within %.0f s: killing it", self.spec.name, grace + 12.0)
        await self.kill()

    async def kill(self) -> None:
        self.stopping = True
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # keeper, API server, engine core, workers
            except (ProcessLookupError, PermissionError):
                pass
            if self.process.returncode is None:
                await self.exited.wait()
            if self.process.stdin is not None:
                self.process.stdin.close()
        await self.close()
