"""Consume a model from a notebook: session tokens, metadata, predictions, and parallel prompts with timing.

Works against this host (deployments at ``/models/<name>/`` and ``/v1``),
any OpenAI-compatible server (vLLM, ``llama_cpp.server``, KServe's
``/openai/v1``), Practicus-style ``user_prompt`` endpoints, and KServe Open
Inference Protocol v2 (``/v2/models/<name>/infer``)::

    from llm_nb import consume
    token = consume.get_session_token(api_url)          # this host: from its connection file
    consume.get_meta(api_url, token)
    consume.predict(api_url, {"user_prompt": "Hi"}, token)
    report = consume.fire(api_url, prompts, concurrency=8)
    report                                               # a table and a latency plot in a notebook
    report.to_pandas()

Kernel side: imports nothing from ``llm_nb.host`` and no model library.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import requests

from .config import stream_read_timeout
from .connection import connection_path, read_connection
from .errors import AuthenticationError, InvalidRequest, LlmNbError, error_from_json
from .streams import Reply

Protocol = Literal["auto", "openai", "practicus", "kserve-v2"]
PROTOCOLS = ("openai", "practicus", "kserve-v2")
RETRY_STATUSES = frozenset({429, 503})
TOKEN_REUSE_MARGIN_S = 60.0


# --- URLs and credentials -------------------------------------------------------------
def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(f"{url!r} is not an http(s) URL")
    return f"{parts.scheme}://{parts.netloc}"


def _deployment_name(url: str) -> str | None:
    parts = [p for p in urllib.parse.urlsplit(url).path.split("/") if p]
    if len(parts) >= 2 and parts[-2] == "models" and (len(parts) < 3 or parts[-3] not in ("v1", "v2")):
        return parts[-1]
    return None


def _kserve_parts(url: str) -> tuple[str, str] | None:
    """(base URL, model name) of ``.../v2/models/<name>[/versions/<v>][/infer]``."""
    path = urllib.parse.urlsplit(url).path
    parts = path.split("/")
    try:
        index = parts.index("v2")
    except ValueError:
        return None
    if len(parts) > index + 2 and parts[index + 1] == "models":
        base = url[: url.index(path)] + "/".join(parts[:index])
        return base, parts[index + 2]
    return None


def detect_protocol(api_url: str) -> str:
    """``/v2/models/<name>`` is KServe v2, ``/models/<name>/`` is Practicus-style, anything else OpenAI."""
    if _kserve_parts(api_url):
        return "kserve-v2"
    if _deployment_name(api_url):
        return "practicus"
    return "openai"


def _openai_base(api_url: str) -> str:
    url = api_url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url if url.endswith("/v1") else url + "/v1"


def _local_key(api_url: str, connection: str | None = None) -> str | None:
    """The host key, when ``api_url`` is the host of this machine's connection file."""
    info = read_connection(connection_path(connection))
    if info and _origin(info["url"]) == _origin(api_url):
        return info["key"]
    return None


def _token_expiry(token: str) -> float | None:
    """``exp`` of a JWT, read without verifying (only the host can); None if it is not one."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) if isinstance(claims, dict) and "exp" in claims else None
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def get_session_token(
    api_url: str,
    api_key: str | None = None,
    *,
    token: str | None = None,
    scope: str | list[str] | None = None,
    ttl: float = 3600,
    connection: str | None = None,
    timeout: float = 30,
) -> str:
    """A short-lived token for ``api_url``; ``token`` is handed back while it has a minute left.

    On this machine's host the key comes from its connection file; for another
    llm-nb host pass ``api_key``. The scope defaults to the deployment or model
    the URL names (``["*"]`` for a bare ``/v1``). A server that mints no tokens
    (vLLM, llama.cpp) takes its API key as it is: that is what comes back.
    """
    if token:
        expiry = _token_expiry(token)
        if expiry is None or expiry - time.time() > TOKEN_REUSE_MARGIN_S:
            return token
    key = api_key or _local_key(api_url, connection)
    if not key:
        raise AuthenticationError(
            f"no key for {_origin(api_url)}: it is not the host in this machine's connection file; "
            "pass api_key=... (or a token=...)"
        )
    if scope is None:
        kserve = _kserve_parts(api_url)
        name = kserve[1] if kserve else _deployment_name(api_url)
        scope = [name] if name else ["*"]
    try:
        response = requests.post(
            _origin(api_url) + "/api/token",
            json={"scope": scope, "ttl": ttl},
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise LlmNbError(f"{_origin(api_url)} does not answer: {exc}", code="host_unavailable") from exc
    if response.status_code in (404, 405) and api_key:
        return api_key  # not an llm-nb host: its key is the credential
    if response.status_code >= 400:
        raise error_from_json(_json_or_text(response), response.status_code)
    return response.json()["token"]


def _json_or_text(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _retry_delay(attempt: int, retry_after: str | None, backoff: float) -> float:
    if retry_after:
        try:
            return min(float(retry_after), 60.0)
        except ValueError:
            pass
    return backoff * 2**attempt * (1 + random.random() * 0.25)


def _sync_request(method: str, url: str, token: str | None, retries: int, backoff: float, **kwargs) -> Any:
    for attempt in range(retries + 1):
        try:
            response = requests.request(method, url, headers=_headers(token), **kwargs)
        except requests.RequestException as exc:
            raise LlmNbError(f"{url} does not answer: {exc}", code="host_unavailable") from exc
        if response.status_code in RETRY_STATUSES and attempt < retries:
            time.sleep(_retry_delay(attempt, response.headers.get("Retry-After"), backoff))
            continue
        if response.status_code >= 400:
            raise error_from_json(_json_or_text(response), response.status_code)
        return _json_or_text(response)
    raise AssertionError("unreachable")


def get_meta(api_url: str, token: str | None = None, *, timeout: float = 30) -> Any:
    """Metadata: a deployment's ``?get_meta=true``, an OpenAI server's model list, a KServe v2 model's metadata."""
    protocol = detect_protocol(api_url)
    if protocol == "practicus":
        url = api_url if api_url.endswith("/") else api_url + "/"
        return _sync_request("GET", url, token, 0, 0, params={"get_meta": "true"}, timeout=timeout)
    if protocol == "kserve-v2":
        base, name = _kserve_parts(api_url)
        return _sync_request("GET", f"{base}/v2/models/{name}", token, 0, 0, timeout=timeout)
    return _sync_request("GET", _openai_base(api_url) + "/models", token, 0, 0, timeout=timeout)


def predict(
    api_url: str,
    payload: dict,
    token: str | None = None,
    *,
    timeout: float = 600,
    retries: int = 3,
    backoff: float = 0.5,
) -> Any:
    """POST ``payload`` as JSON and return the JSON answer; 429 and 503 are retried with backoff."""
    return _sync_request("POST", api_url, token, retries, backoff, json=payload, timeout=timeout)


# --- fire: parallel prompts with timing -------------------------------------------------
@dataclass
class RequestResult:
    index: int
    prompt: str
    ok: bool = False
    status: int | None = None
    error: str | None = None
    started_s: float = 0.0  # since the batch began
    latency_s: float | None = None
    ttft_s: float | None = None  # time to first token (streamed answers only)
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    tokens_counted: str | None = None  # "usage" (the server's count) or "chunks" (stream chunks)
    attempts: int = 0
    text: str = ""


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _batch_summary(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = [r.completion_tokens for r in ok if r.completion_tokens is not None]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "p50_s": _percentile(latencies, 50),
        "p90_s": _percentile(latencies, 90),
        "p99_s": _percentile(latencies, 99),
        "mean_s": sum(latencies) / len(latencies) if latencies else None,
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p90_s": _percentile(ttfts, 90),
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "completion_tokens": sum(tokens) if tokens else None,
        "tokens_per_s": sum(tokens) / wall if tokens and wall > 0 else None,
        "retries": sum(max(0, r.attempts - 1) for r in results),
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}{unit}" if abs(value) < 100 else f"{value:.1f}{unit}"
    return f"{value}{unit}"


@dataclass
class Report:
    """What ``fire`` measured: one row per request, a summary, and the one-at-a-time baseline."""

    api_url: str
    protocol: str
    model: str | None
    concurrency: int
    stream: bool
    results: list[RequestResult]
    wall_s: float
    sequential: list[RequestResult] | None = None
    sequential_wall_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        summary = {"concurrency": self.concurrency, **_batch_summary(self.results, self.wall_s)}
        if self.sequential is not None and self.sequential_wall_s:
            base = _batch_summary(self.sequential, self.sequential_wall_s)
            summary["sequential_wall_s"] = self.sequential_wall_s
            summary["sequential_p50_s"] = base["p50_s"]
            summary["sequential_tokens_per_s"] = base["tokens_per_s"]
            summary["speedup"] = self.sequential_wall_s / self.wall_s if self.wall_s > 0 else None
        return summary

    @property
    def errors(self) -> list[RequestResult]:
        return [r for r in self.results if not r.ok]

    def rows(self, sequential: bool = False) -> list[dict]:
        return [asdict(r) for r in (self.sequential or [] if sequential else self.results)]

    def to_pandas(self, sequential: bool = False):
        """One row per request (``sequential=True``: the one-at-a-time baseline)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.rows(sequential)).set_index("index")

    # --- rendering -----------------------------------------------------------
    def _summary_lines(self) -> list[tuple[str, str]]:
        s = self.summary
        lines = [
            ("endpoint", f"{self.api_url} ({self.protocol}{', ' + self.model if self.model else ''})"),
            ("requests", f"{s['ok']} ok, {s['errors']} errors, {s['retries']} retries, concurrency {self.concurrency}"),
            (
                "latency p50 / p90 / p99",
                f"{_fmt(s['p50_s'], ' s')} / {_fmt(s['p90_s'], ' s')} / {_fmt(s['p99_s'], ' s')}",
            ),
            ("time to first token p50", _fmt(s["ttft_p50_s"], " s")),
            ("throughput", f"{_fmt(s['requests_per_s'])} requests/s, {_fmt(s['tokens_per_s'])} tokens/s"),
            ("wall time", _fmt(s["wall_s"], " s")),
        ]
        if "speedup" in s:
            lines.append(
                (
                    "one at a time",
                    f"{_fmt(s['sequential_wall_s'], ' s')} wall, {_fmt(s['sequential_tokens_per_s'])} tokens/s "
                    f"→ speed-up {_fmt(s['speedup'], '×')}",
                )
            )
        return lines

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self._summary_lines())
        text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in self._summary_lines())
        for r in self.errors[:5]:
            text += f"\nrequest {r.index} failed ({r.status}): {r.error}"
        return text

    def __repr__(self) -> str:
        return f"<Report {self.protocol} {len(self.results)} requests>\n{self}"

    def plot(self, ax=None):
        """Latency plot: each request's span on a timeline (first token marked), parallel over one at a time."""
        from matplotlib.figure import Figure

        runs = [("parallel", self.results)]
        if self.sequential:
            runs.append(("one at a time", self.sequential))
        if ax is None:
            fig = Figure(figsize=(8, 1.2 + 0.25 * len(self.results) * len(runs)))
            axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
        else:
            fig, axes = ax.figure, [ax]
            runs = runs[:1]
        for axis, (label, results) in zip(axes, runs, strict=False):
            for r in results:
                if r.latency_s is None:
                    continue
                color = "tab:blue" if r.ok else "tab:red"
                axis.barh(r.index, r.latency_s, left=r.started_s, color=color, alpha=0.6, height=0.8)
                if r.ttft_s is not None:
                    axis.barh(r.index, r.ttft_s, left=r.started_s, color=color, alpha=1.0, height=0.8)
            axis.set_ylabel(f"{label}\nrequest")
            axis.invert_yaxis()
        axes[-1].set_xlabel("seconds since the batch began (dark: until the first token)")
        s = self.summary
        title = f"p50 {_fmt(s['p50_s'], ' s')} · p90 {_fmt(s['p90_s'], ' s')}"
        if s.get("speedup"):
            title += f" · speed-up {s['speedup']:.2f}× over one at a time"
        axes[0].set_title(title)
        fig.tight_layout()
        return fig

    def _plot_png(self) -> str | None:
        try:
            fig = self.plot()
        except ImportError:
            return None
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        return base64.b64encode(buffer.getvalue()).decode()

    def _repr_html_(self) -> str:
        from html import escape

        summary = "".join(
            f"<tr><th style='text-align:left'>{escape(k)}</th><td style='text-align:left'>{escape(v)}</td></tr>"
            for k, v in self._summary_lines()
        )
        head = "".join(f"<th>{h}</th>" for h in ("#", "status", "latency s", "TTFT s", "tokens", "answer / error"))
        body = ""
        for r in self.results:
            answer = (r.text if r.ok else r.error or "")[:120]
            body += (
                f"<tr><td>{r.index}</td><td>{r.status if r.status is not None else '-'}</td>"
                f"<td>{_fmt(r.latency_s)}</td><td>{_fmt(r.ttft_s)}</td><td>{_fmt(r.completion_tokens)}</td>"
                f"<td style='text-align:left'>{escape(answer)}</td></tr>"
            )
        png = self._plot_png()
        plot = (
            f"<img src='data:image/png;base64,{png}'/>" if png else "<p><i>pip install matplotlib for the plot</i></p>"
        )
        return (
            f"<div><table>{summary}</table>{plot}"
            f"<details><summary>{len(self.results)} requests</summary><table><tr>{head}</tr>{body}</table></details></div>"
        )


class _Sender:
    """One request of one protocol, timed, with retries for 429 and 503 only."""

    def __init__(
        self,
        session,
        api_url: str,
        protocol: str,
        token: str | None,
        model: str | None,
        stream: bool,
        params: dict,
        system_context: str | None,
        retries: int,
        backoff: float,
        input_name: str,
        payload_builder: Callable[[str], dict] | None,
    ):
        self.session = session
        self.api_url = api_url
        self.protocol = protocol
        self.headers = _headers(token)
        self.model = model
        self.stream = stream and protocol == "openai"
        self.params = params
        self.system_context = system_context
        self.retries = retries
        self.backoff = backoff
        self.input_name = input_name
        self.payload_builder = payload_builder

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
                        text = await response.text()
                        try:
                            result.error = str(error_from_json(json.loads(text), response.status))
                        except ValueError:
                            result.error = f"HTTP {response.status}: {text[:300]}"
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
            async for raw in response.content:
                piece = reply.take_line(raw)
                if piece is None:
                    break
                chunks += bool(piece)
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
    compare_sequential: bool = True,
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
        if compare_sequential and concurrency > 1:
            sequential, sequential_wall = await _run_batch(sender, prompts, 1, "one at a time" if progress else None)
    return Report(api_url, protocol, model, concurrency, sender.stream, results, wall, sequential, sequential_wall)


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
    token and tokens; p50/p90/p99, requests/s, tokens/s, errors, and the speed-up over the same
    prompts one at a time (``compare_sequential=False`` skips that second pass).

    ``protocol``: ``"openai"`` (chat completions, streamed with ``stream=True``), ``"practicus"``
    (``{"user_prompt", "system_context"}`` POSTed to a ``/models/<name>/`` URL), ``"kserve-v2"``
    (a BYTES input named ``input_name`` to ``/v2/models/<name>/infer``), or ``"auto"`` from the URL.
    Keyword arguments are those of ``afire``: ``token``, ``api_key``, ``model``, ``system_context``,
    ``max_tokens``, ``temperature``, ``seed``, ``params``, ``retries``, ``backoff``, ``timeout``,
    ``progress``, ``payload_builder``. Responses 429 and 503 are retried with backoff, honouring
    ``Retry-After``; nothing else is.
    """
    return _run_coroutine(lambda: afire(api_url, prompts, concurrency, protocol, stream, **kwargs))


__all__ = ["Report", "RequestResult", "afire", "detect_protocol", "fire", "get_meta", "get_session_token", "predict"]
