"""HTTP plumbing shared by every route: auth, JSON bodies, errors as OpenAI-shaped JSON."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from ..config import LOAD_ON_REQUEST_HEADER
from ..errors import AuthenticationError, InvalidRequest, LlmNbError, PermissionDenied, RequestTooLarge
from .scheduler import CALLER

log = logging.getLogger("llm_nb.host")

_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")

#: Routes anyone on the machine may call: liveness and readiness (cluster probes send
#: no key), nothing about models.
PUBLIC_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})
#: Where errors take KServe v2's shape: ``{"error": "<message>"}``.
V2_PREFIX = "/v2"


def is_v2_path(path: str) -> bool:
    """Whether ``path`` is a KServe v2 route (``/v2`` itself or under it)."""
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(exc: LlmNbError, path: str = "") -> web.Response:
    headers = {"X-LLM-NB-Error-Code": exc.code}
    retry_after = exc.details.get("retry_after")
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="llm-nb"'
    if is_v2_path(path):
        # The Open Inference Protocol's error is a string; v2 clients format it into their
        # exception. Our stable code rides beside it, where those clients do not look.
        body = {"error": exc.message, "code": exc.code}
        return json_response(body, status=exc.status, headers=headers)
    return json_response(exc.to_json(), status=exc.status, headers=headers)


def _refuse_constant(name: str):
    raise InvalidRequest(f"the request body has {name}, which is not JSON; send a finite number (or null)")


def loads(raw: bytes | str):
    """JSON as RFC 8259 has it: ``NaN`` and ``Infinity`` (which Python's parser takes) are a 400."""
    return json.loads(raw, parse_constant=_refuse_constant)


def dumps(data, **kwargs) -> str:
    """JSON that every client parses: a NaN or infinity raises here instead of reaching a strict parser."""
    return json.dumps(data, allow_nan=False, **kwargs)


def json_response(data, **kwargs) -> web.Response:
    """``web.json_response`` through ``dumps``: what the host answers is always JSON."""
    try:
        return web.json_response(data, dumps=dumps, **kwargs)
    except ValueError as exc:  # NaN or infinity, from a deployment's predict or a remote's answer
        raise LlmNbError(
            f"the answer holds a number JSON cannot carry (NaN or infinity): {exc}", code="invalid_output", status=502
        ) from None


async def read_body(request: web.Request) -> bytes:
    """The whole body, up to the host's limit (413), failing (408) if it stops arriving.

    A body shorter than its ``Content-Length`` would otherwise hold its handler forever.
    """
    settings = request.app["settings"]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"the request body is larger than this host's limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await asyncio.wait_for(request.content.readany(), settings.body_timeout)
        except TimeoutError:
            raise LlmNbError(
                f"the request body stopped arriving: nothing for {settings.body_timeout:.0f} s ({size} bytes read)",
                code="request_timeout",
                status=408,
            ) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the request body is larger than this host's limit of {limit} bytes")
        chunks.append(chunk)


async def read_json(request: web.Request):
    """The body as JSON, or a 400/408/413 that says what is wrong with it."""
    raw = await read_body(request)
    if not raw:
        raise InvalidRequest("the request has no body; send a JSON object")
    return parse_json(raw)


def parse_json(raw: bytes, what: str = "the request body"):
    """``raw`` as strict JSON, or a 400 that says what is wrong with ``what``."""
    try:
        body = loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None
    if _ESCAPED_SURROGATE.search(raw):  # a lone "\ud800" decodes, then breaks every encoder after
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{what} has an unpaired UTF-16 surrogate escape (like \\ud800)") from None
    return body


def may_load(request: web.Request) -> bool:
    """Whether this request may load the model it names on first use (llm-nb's own clients say no)."""
    return request.headers.get(LOAD_ON_REQUEST_HEADER, "1").strip() != "0"


#: Hub mode: a user's deployment NAME is "USER~NAME" on the shared host (its URL /models/USER~NAME/).
OWNER_SEP = "~"


class Principal:
    """Who is calling: the host key (everything), a session token (its scope), a deployment, or
    (in hub mode) a Hub user, whose rules are the host's rules for users."""

    def __init__(self, kind: str, scope: frozenset[str] | None = None, subject: str | None = None, user=None):
        self.kind = kind
        self.scope = scope  # None: every model and deployment
        self.subject = subject
        self.user = user  # hub.HubUser for kind "user"

    @property
    def user_name(self) -> str | None:
        return self.user.name if self.user is not None else None

    @property
    def is_operator(self) -> bool:
        """The host key, or a Hub admin: may act on what other users hold."""
        return self.kind == "key" or (self.user is not None and self.user.admin)

    def require_operator(self, what: str) -> None:
        if not self.is_operator:
            raise PermissionDenied(
                f"{what} is for JupyterHub admins (or users with the custom:llm-nb:admin scope); "
                f"{self.user_name or 'this token'} is neither"
            )

    def allows(self, name: str) -> bool:
        return self.scope is None or name in self.scope

    def require(self, name: str) -> None:
        if not self.allows(name):
            raise PermissionDenied(f"this session token is not valid for {name!r}; ask for a token scoped to it")

    # --- hub mode: deployments are per user, named "USER~NAME" ----------------------------
    def deployment_name(self, name: str) -> str:
        """The deployment a caller means by ``name``: a Hub user's own ("alice~name"), unless named in full."""
        if self.user is None or OWNER_SEP in name:
            return name
        return f"{self.user.name}{OWNER_SEP}{name}"

    def may_use_deployment(self, name: str) -> bool:
        if self.user is None:
            return self.allows(name)
        return self.user.admin or name.startswith(self.user.name + OWNER_SEP)

    def require_deployment(self, name: str) -> None:
        if not self.may_use_deployment(name):
            if self.user is not None:
                raise PermissionDenied(
                    f"{name!r} is another user's deployment; its owner can give you a session token for it"
                )
            self.require(name)

    def require_admin(self) -> None:
        """The host's own routes (load, unload, deploy): the host key, or a Hub user under the user rules."""
        if self.kind not in ("key", "user"):
            raise PermissionDenied("this route needs the host key, not a session token")


#: Who sent the request: the host key, a session token or a deployment (set by the auth middleware).
PRINCIPAL = web.RequestKey("principal", Principal)


def make_auth_middleware(
    key: str,
    token_verifier: Callable[[str], Principal | None] | None = None,
    hub_verifier: Callable[[str], Awaitable[Principal | None]] | None = None,
):
    """``hub_verifier``: in hub mode, asks the Hub whose API token a credential is."""
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
        if principal is None and hub_verifier is not None:
            principal = await hub_verifier(credential.strip())
        if principal is None:
            raise AuthenticationError(
                "the key or session token is wrong or has expired"
                + ("; on a JupyterHub, send your own Hub API token ($JUPYTERHUB_API_TOKEN)" if hub_verifier else "")
            )
        request[PRINCIPAL] = principal
        CALLER.set(principal.user_name)  # the fair queues take users in turn
        return await handler(request)

    return auth


def make_connection_limit(max_per_address: int):
    """At most ``max_per_address`` requests open at once from one address; more are a 503 at once.

    Checked before the key, so a flood without one is capped too.
    """
    open_requests: dict[str, int] = {}

    @web.middleware
    async def limit(request: web.Request, handler):
        address = request.remote or "?"
        if open_requests.get(address, 0) >= max_per_address:
            raise LlmNbError(
                f"{address} has {max_per_address} requests open on this host already; retry when some end",
                code="too_many_connections",
                status=503,
                retry_after=1,
            )
        open_requests[address] = open_requests.get(address, 0) + 1
        try:
            return await handler(request)
        finally:
            open_requests[address] -= 1
            if not open_requests[address]:
                del open_requests[address]

    return limit


@web.middleware
async def error_middleware(request: web.Request, handler):
    response = await _answer_errors(request, handler)
    if response.status >= 400 and not request.content.is_eof():
        # A refused request (no key, too large, ...) whose body was not read: the connection
        # closes after the answer (and a short linger, see app.LINGER_S), never reused.
        response.force_close()
    return response


async def _answer_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except LlmNbError as exc:
        return error_response(exc, request.path)
    except web.HTTPRequestEntityTooLarge:
        return error_response(RequestTooLarge("the request body is larger than this host's limit"), request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        message = {
            404: f"no route {request.method} {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        return error_response(LlmNbError(message, code=code, status=exc.status), request.path)
    except asyncio.CancelledError:
        raise
    except (ConnectionResetError, BrokenPipeError):
        raise  # the client went away: nothing to answer
    except Exception as exc:  # the host survives every bad request
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(LlmNbError(f"internal error: {type(exc).__name__}: {exc}"), request.path)


async def end_progress(response: web.StreamResponse, result: Callable[[], dict]) -> web.StreamResponse:
    """End an NDJSON progress stream with ``{"event": "done", **result()}``, or the error ``result()`` raises."""
    try:
        event = {"event": "done", **result()}
    except LlmNbError as exc:
        event = {"event": "error", **exc.to_json(), "status": exc.status}
    await response.write((dumps(event) + "\n").encode())
    await response.write_eof()
    return response


async def start_event_stream(request: web.Request) -> web.StreamResponse:
    """A prepared server-sent-events response: no caching, no proxy buffering."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
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
