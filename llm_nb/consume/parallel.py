"""``fire``: prompts in parallel (aiohttp), each timed, with retries for 429 and 503 only."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import stream_read_timeout
from ..errors import InvalidRequest, LlmNbError
from ..streams import Reply, atext_pieces
from ..transport import error_answer
from .endpoints import (
    PROTOCOLS,
    RETRY_STATUSES,
    Protocol,
    _headers,
    _kserve_parts,
    _local_key,
    _openai_base,
    _retry_delay,
    detect_protocol,
    get_meta,
    get_session_token,
)
from .report import Report, RequestResult

#: Prompts the one-at-a-time baseline sends by default: enough for a speed-up figure, not a second run.
SEQUENTIAL_SAMPLE = 8


@dataclass
class _Sender:
    """One request of one protocol, timed, with retries for 429 and 503 only."""

    session: Any  # an aiohttp.ClientSession
    api_url: str
    protocol: str
    token: str | None
    model: str | None
    stream: bool
    params: dict
    system_context: str | None
    retries: int
    backoff: float
    input_name: str
    payload_builder: Callable[[str], dict] | None

    def __post_init__(self) -> None:
        self.headers = _headers(self.token)
        self.stream = self.stream and self.protocol == "openai"  # only OpenAI servers stream here

    def request(self, index: int, prompt: str) -> tuple[str, dict]:
        if self.payload_builder is not None:
            return self.api_url, self.payload_builder(prompt)
        if self.protocol == "openai":
            messages = [{"role": "user", "content": prompt}]
            if self.system_context:
                messages.insert(0, {"role": "system", "content": self.system_context})
            body = {"model": self.model, "messages": messages, **self.params}
            if self.stream:
                body.update(stream=True, stream_options={"include_usage": True})
            return _openai_base(self.api_url) + "/chat/completions", body
        if self.protocol == "practicus":
            body = {"user_prompt": prompt, **self.params}
            if self.system_context:
                body["system_context"] = self.system_context
            return self.api_url, body
        base, name = _kserve_parts(self.api_url)
        body = {
            "id": str(index),
            "inputs": [{"name": self.input_name, "shape": [1], "datatype": "BYTES", "data": [prompt]}],
        }
        if self.params:
            body["parameters"] = self.params
        return f"{base}/v2/models/{name}/infer", body

    async def send(self, index: int, prompt: str, batch_start: float) -> RequestResult:
        import aiohttp

        result = RequestResult(index=index, prompt=prompt)
        url, body = self.request(index, prompt)
        started = time.perf_counter()
        result.started_s = started - batch_start
        for attempt in range(self.retries + 1):
            result.attempts = attempt + 1
            try:
                async with self.session.post(url, json=body, headers=self.headers) as response:
                    result.status = response.status
                    if response.status in RETRY_STATUSES and attempt < self.retries:
                        await response.read()
                        await asyncio.sleep(_retry_delay(attempt, response.headers.get("Retry-After"), self.backoff))
                        continue
                    if response.status >= 400:
                        result.error = str(error_answer(response.status, await response.read()))
                        break
                    if self.stream and "text/event-stream" in response.headers.get("Content-Type", ""):
                        await self._read_stream(response, result, started)
                    else:
                        self._read_whole(await response.json(content_type=None), result)
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            break
        result.latency_s = time.perf_counter() - started
        result.ok = result.error is None
        return result

    async def _read_stream(self, response, result: RequestResult, started: float) -> None:
        reply = Reply(started)
        chunks = 0
        try:
            async for _ in atext_pieces(response.content, reply):
                chunks += 1
        except LlmNbError as exc:  # an error the server sent in the stream
            result.error = str(exc)
            return
        finally:
            result.text = reply.text
            result.ttft_s = reply.first_token_s
        if reply.usage:
            result.completion_tokens = reply.usage.get("completion_tokens")
            result.prompt_tokens = reply.usage.get("prompt_tokens")
            result.tokens_counted = "usage"
        if not reply.finished:
            # llama_cpp.server, for one, ends a running stream this way when another request comes in.
            result.error = "the stream ended without a finish_reason: the server cut the answer off"
            return
        if result.completion_tokens is None and chunks:
            result.completion_tokens = chunks  # servers without usage in streams send about a token a chunk
            result.tokens_counted = "chunks"

    def _read_whole(self, data: Any, result: RequestResult) -> None:
        if self.protocol == "openai" and isinstance(data, dict) and "choices" in data:
            choice = data["choices"][0]
            result.text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        elif self.protocol == "kserve-v2" and isinstance(data, dict) and "outputs" in data:
            values = [v for out in data["outputs"] for v in out.get("data", [])]
            result.text = " ".join(str(v) for v in values)
        else:
            answer = data
            if isinstance(data, dict):
                answer = next((data[k] for k in ("answer", "text", "result", "output") if k in data), data)
            result.text = answer if isinstance(answer, str) else json.dumps(answer)
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            result.completion_tokens = usage["completion_tokens"]
            result.prompt_tokens = usage.get("prompt_tokens")
            result.tokens_counted = "usage"


async def _run_batch(
    sender: _Sender, prompts: list[str], concurrency: int, bar_label: str | None
) -> tuple[list[RequestResult], float]:
    bar = None
    if bar_label is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=bar_label, unit="req", leave=False)
    semaphore = asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def one(index: int, prompt: str) -> RequestResult:
        async with semaphore:
            result = await sender.send(index, prompt, start)
        if bar is not None:
            bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        if bar is not None:
            bar.close()
    return list(results), time.perf_counter() - start


async def afire(
    api_url: str,
    prompts: Sequence[str],
    concurrency: int = 8,
    protocol: Protocol = "auto",
    stream: bool = True,
    *,
    token: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    system_context: str | None = None,
    max_tokens: int | None = 128,
    temperature: float | None = None,
    seed: int | None = None,
    params: dict | None = None,
    compare_sequential: bool | int = SEQUENTIAL_SAMPLE,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 600,
    progress: bool = True,
    input_name: str = "text_input",
    payload_builder: Callable[[str], dict] | None = None,
) -> Report:
    """``fire`` for code that already runs an event loop (``await consume.afire(...)``)."""
    import aiohttp

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise InvalidRequest("fire() needs at least one prompt")
    if concurrency < 1:
        raise InvalidRequest("concurrency must be at least 1")
    sample = sequential_sample(compare_sequential, len(prompts)) if concurrency > 1 else 0
    protocol = detect_protocol(api_url) if protocol == "auto" else protocol
    if protocol not in PROTOCOLS:
        raise InvalidRequest(f"protocol must be auto, {', '.join(PROTOCOLS)}; not {protocol!r}")
    local_host = await asyncio.to_thread(_local_key, api_url) is not None
    if token is None and (api_key or local_host):
        token = await asyncio.to_thread(get_session_token, api_url, api_key)
    extra = dict(params or {})
    if protocol == "openai":
        extra.update(
            {
                k: v
                for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed))
                if v is not None
            }
        )
        if model is None:
            listed = await asyncio.to_thread(get_meta, api_url, token, timeout=timeout)
            ids = [m["id"] for m in listed.get("data", [])] if isinstance(listed, dict) else []
            if not ids:
                raise InvalidRequest(f"{api_url} lists no models; pass model=...")
            model = ids[0]
    elif protocol == "kserve-v2":
        model = _kserve_parts(api_url)[1]
        extra.update({k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None})
    connector = aiohttp.TCPConnector(limit=0)
    # This machine's host sends heartbeats on its streams, so a stream silent past a few of them means the
    # host hung or went: that request fails in seconds instead of stalling the run. Other servers send none.
    heartbeats = local_host and stream and protocol == "openai" and payload_builder is None
    sock_read = stream_read_timeout() if heartbeats else None
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_read=sock_read)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        sender = _Sender(
            session, api_url, protocol, token, model, stream, extra, system_context, retries, backoff,
            input_name, payload_builder,
        )  # fmt: skip
        label = f"{len(prompts)} prompts × {concurrency}" if progress else None
        results, wall = await _run_batch(sender, prompts, concurrency, label)
        sequential, sequential_wall = None, None
        if sample:
            label = f"one at a time ({sample} of {len(prompts)})" if progress else None
            sequential, sequential_wall = await _run_batch(sender, prompts[:sample], 1, label)
    return Report(api_url, protocol, model, concurrency, sender.stream, results, wall, sequential, sequential_wall)


def sequential_sample(compare_sequential: bool | int, prompts: int) -> int:
    """How many prompts the one-at-a-time baseline sends: all for ``True``, none for ``False`` or 0,
    else the first ``compare_sequential`` of them."""
    if compare_sequential is True:
        return prompts
    if compare_sequential is False or compare_sequential is None:
        return 0
    if not isinstance(compare_sequential, int) or compare_sequential < 0:
        raise InvalidRequest(
            f"compare_sequential must be True, False or a number of prompts, not {compare_sequential!r}"
        )
    return min(compare_sequential, prompts)


def _run_coroutine(factory: Callable[[], Awaitable]) -> Any:
    """Run a coroutine to its end from sync code, even inside Jupyter's running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:  # handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="llm-nb-fire")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def fire(
    api_url: str,
    prompts: Sequence[str],
    concurrency: int = 8,
    protocol: Protocol = "auto",
    stream: bool = True,
    **kwargs: Any,
) -> Report:
    """Send ``prompts`` in parallel (aiohttp) and measure: per request status, latency, time to first
    token and tokens; p50/p90/p99, requests/s, tokens/s, errors, and the speed-up over one at a
    time. That baseline sends the first ``compare_sequential`` prompts again, one by one (default 8,
    so a large run does not double the load it puts on the endpoint; ``True``: every prompt again,
    ``False``: no baseline); the speed-up compares time per request, and the report names the sample.

    ``protocol``: ``"openai"`` (chat completions, streamed with ``stream=True``), ``"practicus"``
    (``{"user_prompt", "system_context"}`` POSTed to a ``/models/<name>/`` URL), ``"kserve-v2"``
    (a BYTES input named ``input_name`` to ``/v2/models/<name>/infer``), or ``"auto"`` from the URL.
    Keyword arguments are those of ``afire``: ``token``, ``api_key``, ``model``, ``system_context``,
    ``max_tokens``, ``temperature``, ``seed``, ``params``, ``retries``, ``backoff``, ``timeout``,
    ``progress``, ``payload_builder``. Responses 429 and 503 are retried with backoff, honouring
    ``Retry-After``; nothing else is.
    """
    return _run_coroutine(lambda: afire(api_url, prompts, concurrency, protocol, stream, **kwargs))
