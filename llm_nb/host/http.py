"""HTTP plumbing shared by every route: auth, JSON bodies, errors as OpenAI-shaped JSON."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..errors import AuthenticationError, InvalidRequest, LlmNbError, PermissionDenied, RequestTooLarge

log = logging.getLogger("llm_nb.host")

_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")

#: Routes anyone on the machine may call: liveness only, nothing about models.
PUBLIC_PATHS = frozenset({"/health", "/v2/health/live"})


def error_response(exc: LlmNbError) -> web.Response:
    headers = {}
    retry_after = exc.details.get("retry_after")
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="llm-nb"'
    return web.json_response(exc.to_json(), status=exc.status, headers=headers)


async def read_json(request: web.Request):
    """The body as JSON, or a 400/413 that says what is wrong with it."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestTooLarge(
            f"the request body is larger than this host's limit of {request.app['settings'].max_body_bytes} bytes"
        ) from exc
    if not raw:
        raise InvalidRequest("the request has no body; send a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if _ESCAPED_SURROGATE.search(raw):  # a lone "\ud800" decodes, then breaks every encoder after
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("the request body has an unpaired UTF-16 surrogate escape (like \\ud800)") from None
    return body


class Principal:
    """Who is calling: the host key (everything) or a session token (its scope)."""

    def __init__(self, kind: str, scope: frozenset[str] | None = None, subject: str | None = None):
        self.kind = kind
        self.scope = scope  # None: every model and deployment
        self.subject = subject

    def allows(self, name: str) -> bool:
        return self.scope is None or name in self.scope

    def require(self, name: str) -> None:
        if not self.allows(name):
            raise PermissionDenied(f"this session token is not valid for {name!r}; ask for a token scoped to it")

    def require_admin(self) -> None:
        if self.kind != "key":
            raise PermissionDenied("this route needs the host key, not a session token")


#: Who sent the request: the host key, a session token or a deployment (set by the auth middleware).
PRINCIPAL = web.RequestKey("principal", Principal)


def make_auth_middleware(key: str, token_verifier: Callable[[str], Principal | None] | None = None):
    key_bytes = key.encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationError(
                "this host needs `Authorization: Bearer <key>`; the key is in the host's connection file "
                "(llm_nb.client finds it for you)"
            )
        principal = None
        if hmac.compare_digest(credential.strip().encode(), key_bytes):
            principal = Principal("key")
        elif token_verifier is not None:
            principal = token_verifier(credential.strip())
        if principal is None:
            raise AuthenticationError("the key or session token is wrong or has expired")
        request[PRINCIPAL] = principal
        return await handler(request)

    return auth


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except LlmNbError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(RequestTooLarge("the request body is larger than this host's limit"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        message = {
            404: f"no route {request.method} {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        return error_response(LlmNbError(message, code=code, status=exc.status))
    except asyncio.CancelledError:
        raise
    except (ConnectionResetError, BrokenPipeError):
        raise  # the client went away: nothing to answer
    except Exception as exc:  # the host survives every bad request
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(LlmNbError(f"internal error: {type(exc).__name__}: {exc}"))


async def end_progress(response: web.StreamResponse, result: Callable[[], dict]) -> web.StreamResponse:
    """End an NDJSON progress stream with ``{"event": "done", **result()}``, or the error ``result()`` raises."""
    try:
        event = {"event": "done", **result()}
    except LlmNbError as exc:
        event = {"event": "error", **exc.to_json(), "status": exc.status}
    await response.write((json.dumps(event) + "\n").encode())
    await response.write_eof()
    return response


HEARTBEAT = None  # what ``with_heartbeats`` yields when the source was silent for an interval


async def with_heartbeats(source: AsyncIterator, interval: float) -> AsyncIterator:
    """``source``'s items, and ``HEARTBEAT`` whenever it was silent for ``interval`` seconds.

    The source runs in one task of its own for its whole life (so timers and
    cancellation inside it stay with one task); closing this generator cancels
    that task, which closes the source: a queue slot is given back, a worker
    request is cancelled. Errors from the source are raised here.
    """
    items: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        try:
            async for item in source:
                await items.put((True, item))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the reader, which raises it
            await items.put((False, exc))
            return
        await items.put((False, None))

    task = asyncio.ensure_future(pump())
    getter: asyncio.Future | None = None
    try:
        while True:
            if getter is None:
                getter = asyncio.ensure_future(items.get())
            done, _ = await asyncio.wait({getter}, timeout=interval)
            if not done:
                yield HEARTBEAT
                continue
            is_item, value = getter.result()
            getter = None
            if is_item:
                yield value
            elif value is None:
                return
            else:
                raise value
    finally:
        for pending in (getter, task):
            if pending is not None and not pending.done():
                pending.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*(p for p in (getter, task) if p is not None), return_exceptions=True)
