"""The one way the kernel side sends a request to an llm-nb host: sync (requests) and async (aiohttp).

A request goes where a *locator* says (``llm_nb.locator``): ``HostLocator`` (a
connection file; it may start a host) or ``FixedHost`` (a URL and a credential:
a deployment's ``model.py``, a host on another machine). The rules live here once:

- the key or token goes in ``Authorization``;
- a request that never reached the host (``nothing_sent``) is sent again, once,
  to the host the locator finds next; so is one answered 401 (a new host with a
  new key took over the connection file);
- an error answer becomes the ``llm_nb.errors`` exception the host raised;
- a request that was sent and then lost its host raises ``locator.lost(...)``:
  it is never sent again, as the host may have acted on it.

Streams are read with a short read timeout (``config.stream_read_timeout``): the
host sends heartbeats on them, so a silent stream means a hung or dead host.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import requests

from .config import LOAD_ON_REQUEST_HEADER, stream_read_timeout
from .errors import LlmNbError, error_from_json
from .streams import progress_answer

if TYPE_CHECKING:
    from .locator import Locator

CONNECT_TIMEOUT_S = 10.0


def caused_by(exc: BaseException, kinds: tuple[type, ...]) -> bool:
    """True if ``exc`` or anything it wraps (args, ``reason``, cause, context) is one of ``kinds``.

    requests and aiohttp wrap the socket's own error a few layers deep.
    """
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return True
        stack.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
        stack.extend([getattr(current, "reason", None), current.__cause__, current.__context__])
    return False


def nothing_sent(exc: BaseException) -> bool:
    """True when a request failed before it reached the host: the connection was refused or never made.

    Only then may a client start a new host and send the request again; a request
    that was sent may have been acted on (a load begun, tokens generated).
    """
    from urllib3.exceptions import NewConnectionError

    aiohttp = sys.modules.get("aiohttp")  # an aiohttp error can only come from code that imported it
    refused: tuple[type, ...] = (ConnectionRefusedError, NewConnectionError, requests.exceptions.ConnectTimeout)
    if aiohttp is not None:
        refused += (aiohttp.ClientConnectorError,)
    return caused_by(exc, refused)


def read_timed_out(exc: BaseException) -> bool:
    from urllib3.exceptions import ReadTimeoutError

    return caused_by(exc, (ReadTimeoutError, requests.exceptions.ReadTimeout, TimeoutError))


def error_answer(status: int, payload: bytes | str) -> LlmNbError:
    """The exception an error answer stands for: the host's JSON error, or its text."""
    try:
        body: Any = json.loads(payload)
    except ValueError:
        body = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    return error_from_json(body, status)


class SyncTransport:
    """Requests to the host a locator names, with requests; the base of ``Client``."""

    def __init__(self, locator: Locator, timeout: float = 600.0):
        self.locator = locator
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers[LOAD_ON_REQUEST_HEADER] = "0"  # loads go through load(), with a lease

    def host_info(self, refresh: bool = False) -> dict:
        info = self.locator.find(refresh)
        self.session.headers["Authorization"] = f"Bearer {info['key']}"
        return info

    @property
    def url(self) -> str:
        return self.host_info()["url"]

    def send(self, method: str, path: str, *, retry: bool = True, stream: bool = False, **kwargs) -> requests.Response:
        """One request; an error answer raises. ``stream``: the body is read as it comes, with a short read timeout."""
        # A stream is never silent for long (the host sends heartbeats), so its reads time out soon;
        # a plain request may wait for its whole answer.
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, stream_read_timeout() if stream else self.timeout))
        info = self.host_info()
        try:
            response = self.session.request(method, info["url"] + path, stream=stream, **kwargs)
        except requests.RequestException as exc:
            if retry and self.locator.replaceable and nothing_sent(exc):
                # Nothing reached the host (it is gone): find the one that took over, or start one, once.
                self.host_info(refresh=True)
                return self.send(method, path, retry=False, stream=stream, **kwargs)
            raise self.locator.lost(info, exc) from exc
        if response.status_code == 401 and retry and self.locator.replaceable:
            response.close()  # a new host with a new key took over the connection file
            self.host_info(refresh=True)
            return self.send(method, path, retry=False, stream=stream, **kwargs)
        if response.status_code >= 400:
            raise error_answer(response.status_code, response.content)
        return response

    def call(self, method: str, path: str, body: Any = None, **kwargs) -> Any:
        """A request with a JSON body (if any) and a JSON answer."""
        return self.send(method, path, json=body, **kwargs).json()

    def lines(self, path: str, body: dict) -> tuple[Iterator[bytes], Callable[[], None]]:
        """POST and read the answer line by line: ``(lines, close)``; closing early cancels the work on the host."""
        response = self.send("POST", path, json=body, stream=True)
        info = self.locator.info

        def lines() -> Iterator[bytes]:
            try:
                yield from response.iter_lines()
            except requests.RequestException as exc:
                raise self.locator.lost(info, exc) from exc

        return lines(), response.close

    def progress(self, path: str, body: dict, on_progress: Callable[[dict], None] | None) -> dict:
        """POST with ``stream: true``: progress lines, then the answer; a host that dies mid-stream is an error."""
        lines, close = self.lines(path, dict(body, stream=True))
        try:
            for line in lines:
                answer = progress_answer(line, on_progress)
                if answer is not None:
                    return answer
        finally:
            close()
        raise self.locator.no_answer(path)


class AsyncTransport:
    """The same requests with aiohttp, for code inside an event loop; the base of ``AsyncClient``."""

    def __init__(self, locator: Locator, timeout: float = 600.0):
        self.locator = locator
        self.timeout = timeout
        self._session = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def host_info(self, refresh: bool = False) -> dict:
        return await asyncio.to_thread(self.locator.find, refresh)

    async def _lost(self, info: dict, exc: BaseException) -> LlmNbError:
        return await asyncio.to_thread(self.locator.lost, info, exc)

    async def send(
        self, method: str, path: str, body: Any = None, *, stream: bool = False, retry: bool = True
    ) -> tuple[Any, dict]:
        """One request: ``(response, host info)``; an error answer raises. The rules of ``SyncTransport.send``."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        timeout = None
        if stream:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=stream_read_timeout())
        info = await self.host_info()
        try:
            response = await self._session.request(
                method,
                info["url"] + path,
                json=body,
                headers={"Authorization": f"Bearer {info['key']}", LOAD_ON_REQUEST_HEADER: "0"},
                **({"timeout": timeout} if timeout is not None else {}),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if retry and self.locator.replaceable and nothing_sent(exc):
                await self.host_info(refresh=True)
                return await self.send(method, path, body, stream=stream, retry=False)
            raise await self._lost(info, exc) from exc
        if response.status == 401 and retry and self.locator.replaceable:
            response.release()  # a new host with a new key took over the connection file
            await self.host_info(refresh=True)
            return await self.send(method, path, body, stream=stream, retry=False)
        if response.status >= 400:
            payload = await response.read()
            response.release()
            raise error_answer(response.status, payload)
        return response, info

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        import aiohttp

        response, info = await self.send(method, path, body)
        try:
            async with response:
                return await response.json()
        except (aiohttp.ClientError, OSError) as exc:
            raise await self._lost(info, exc) from exc

    async def lines(self, path: str, body: dict) -> AsyncIterator[bytes]:
        """POST and yield the answer's lines; leaving early closes the stream (the host cancels the work)."""
        import aiohttp

        response, info = await self.send("POST", path, body, stream=True)
        try:
            async with response:
                async for line in response.content:
                    yield line
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise await self._lost(info, exc) from exc

    async def progress(self, path: str, body: dict, on_progress: Callable[[dict], None] | None) -> dict:
        lines = self.lines(path, dict(body, stream=True))
        try:
            async for line in lines:
                answer = progress_answer(line, on_progress)
                if answer is not None:
                    return answer
        finally:
            await lines.aclose()
        raise self.locator.no_answer(path)
