"""One exception hierarchy for the host, the client, the CLI and the magics.

Every error carries a stable string ``code`` that callers can branch on and
the HTTP status the host answers it with. Over HTTP an error is OpenAI-shaped:
``{"error": {"message": ..., "type": ..., "code": ...}}``; the client turns
that body back into the same class.
"""

from __future__ import annotations

import sys
from typing import Any


class LlmNbError(Exception):
    """Base class: ``message`` says what failed, why, and what to do."""

    code = "internal_error"
    status = 500
    type = "server_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, **details: Any):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details

    def to_json(self) -> dict:
        body = {"message": self.message, "type": self.type, "code": self.code}
        body.update({k: v for k, v in self.details.items() if v is not None})
        return {"error": body}

    def __str__(self) -> str:
        return self.message


class InvalidRequest(LlmNbError):
    code, status, type = "invalid_request", 400, "invalid_request_error"


class AuthenticationError(LlmNbError):
    code, status, type = "invalid_api_key", 401, "authentication_error"


class PermissionDenied(LlmNbError):
    code, status, type = "permission_denied", 403, "permission_error"


class ModelNotFound(LlmNbError):
    code, status, type = "model_not_found", 404, "invalid_request_error"


class RequestTooLarge(LlmNbError):
    code, status, type = "request_too_large", 413, "invalid_request_error"


class ContextLengthExceeded(LlmNbError):
    code, status, type = "context_length_exceeded", 422, "invalid_request_error"


class QueueFull(LlmNbError):
    code, status, type = "queue_full", 429, "rate_limit_error"


class ModelLoading(LlmNbError):
    code, status, type = "model_loading", 503, "server_error"


class ModelCrashed(LlmNbError):
    code, status, type = "model_crashed", 502, "server_error"


class ModelFailed(LlmNbError):
    """A load that did not succeed (bad file, backend error, worker died while loading)."""

    code, status, type = "load_failed", 500, "server_error"


class InsufficientMemory(LlmNbError):
    code, status, type = "insufficient_memory", 507, "server_error"


class BackendUnavailable(LlmNbError):
    code, status, type = "backend_unavailable", 400, "invalid_request_error"


class HostUnavailable(LlmNbError):
    """The client could not reach or start a host."""

    code, status, type = "host_unavailable", 503, "connection_error"


class RemoteError(LlmNbError):
    code, status, type = "remote_error", 502, "server_error"


class Timeout(LlmNbError):
    code, status, type = "timeout", 504, "server_error"


class StructuredOutputError(LlmNbError):
    """A reply that does not parse as JSON or does not validate against its schema.

    Only a ``json_object`` reply, a reply cut at ``max_tokens`` or a remote engine's can fail so:
    local decoding under a schema is constrained. ``raw`` is the reply's text as it came.
    """

    code, status, type = "invalid_output", 502, "server_error"

    def __init__(self, message: str, *, raw: str = "", **details: Any):
        super().__init__(message, **details)
        self.raw = raw


_BY_CODE: dict[str, type[LlmNbError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        AuthenticationError,
        PermissionDenied,
        ModelNotFound,
        RequestTooLarge,
        ContextLengthExceeded,
        QueueFull,
        ModelLoading,
        ModelCrashed,
        ModelFailed,
        InsufficientMemory,
        BackendUnavailable,
        HostUnavailable,
        RemoteError,
        Timeout,
        StructuredOutputError,
    )
}


def error_from_json(body: Any, status: int) -> LlmNbError:
    """Rebuild the exception the host raised from its JSON error body."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return LlmNbError(f"the host answered HTTP {status}: {str(body)[:300]}", status=status)
    code = str(error.get("code") or "")
    cls = _BY_CODE.get(code, LlmNbError)
    details = {k: v for k, v in error.items() if k not in ("message", "type", "code")}
    exc = cls(str(error.get("message") or f"HTTP {status}"), **details)
    if cls is LlmNbError:  # a code this version does not know: keep what the host said
        exc.status = status
        if code:
            exc.code = code
    return exc


def print_notice(message: str) -> None:
    """A one-line notice that is not an error (``started a new host: ...``), where errors go: stderr."""
    print(f"llm-nb: {message}", file=sys.stderr, flush=True)
