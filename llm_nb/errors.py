"""One exception hierarchy for the host, the client, the CLI and the magics.

Every error carries a stable string ``code`` that callers can branch on and
the HTTP status the host answers it with. Over HTTP an error is OpenAI-shaped:
``{"error": {"message": ..., "type": ..., "code": ...}}``; the client turns
that body back into the same class.
"""

from __future__ import annotations

import sys
from typing import Any

#: OpenAI's error types for the statuses that have their own; any other 4xx is an
#: ``invalid_request_error`` (as OpenAI labels an unknown model's 404), any 5xx a ``server_error``.
_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class LlmNbError(Exception):
    """Base class: ``message`` says what failed, why, and what to do."""

    code = "internal_error"
    status = 500
    #: OpenAI's error ``type`` when it is not the one the status implies (see ``type``).
    openai_type: str | None = None

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, **details: Any):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details

    @property
    def type(self) -> str:
        """OpenAI's ``type`` for this error: what its clients and SDKs branch on, beside our ``code``."""
        if self.openai_type:
            return self.openai_type
        if self.status >= 500:
            return "server_error"
        return _TYPE_BY_STATUS.get(self.status, "invalid_request_error")

    def to_json(self) -> dict:
        body = {"message": self.message, "type": self.type, "code": self.code}
        body.update({k: v for k, v in self.details.items() if v is not None})
        return {"error": body}

    def __str__(self) -> str:
        return self.message


class InvalidRequest(LlmNbError):
    code, status = "invalid_request", 400


class InvalidModelFile(InvalidRequest):
    """A model path that is not a loadable model: empty, truncated, not GGUF, not a model folder..."""

    code = "invalid_model_file"


class AuthenticationError(LlmNbError):
    code, status = "invalid_api_key", 401


class PermissionDenied(LlmNbError):
    code, status = "permission_denied", 403


class ModelNotFound(LlmNbError):
    code, status = "model_not_found", 404


class RequestTooLarge(LlmNbError):
    code, status = "request_too_large", 413


class ContextLengthExceeded(LlmNbError):
    code, status = "context_length_exceeded", 422


class QueueFull(LlmNbError):
    code, status = "queue_full", 429


class ModelLoading(LlmNbError):
    code, status = "model_loading", 503


class ModelCrashed(LlmNbError):
    code, status = "model_crashed", 502


class CrashedRecently(LlmNbError):
    """A load refused because the same model, loaded the same way, just died of a fault signal."""

    code, status = "crashed_recently", 409


class ModelFailed(LlmNbError):
    """A load that did not succeed (bad file, backend error, worker died while loading)."""

    code, status = "load_failed", 500


class InsufficientMemory(LlmNbError):
    code, status = "insufficient_memory", 507


class RayCannotFit(LlmNbError):
    """Ray replicas that no node of the cluster could ever take (nor its autoscaler's largest size)."""

    code, status = "ray_cannot_fit", 409


class RayResourcesBusy(LlmNbError):
    """Ray replicas the cluster cannot place beside what runs now (at once, or after the wait asked for)."""

    code, status = "ray_resources_busy", 409


class BackendUnavailable(LlmNbError):
    code, status = "backend_unavailable", 400


class HostUnavailable(LlmNbError):
    """The client could not reach or start a host."""

    code, status = "host_unavailable", 503
    openai_type = "connection_error"  # raised on the client side: no server answered


class RemoteError(LlmNbError):
    code, status = "remote_error", 502


class Timeout(LlmNbError):
    code, status = "timeout", 504


class StructuredOutputError(LlmNbError):
    """A reply that does not parse as JSON or does not validate against its schema.

    Only a ``json_object`` reply, a reply cut at ``max_tokens`` or a remote engine's can fail so:
    local decoding under a schema is constrained. ``raw`` is the reply's text as it came.
    """

    code, status = "invalid_output", 502

    def __init__(self, message: str, *, raw: str = "", **details: Any):
        super().__init__(message, **details)
        self.raw = raw


_BY_CODE: dict[str, type[LlmNbError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidModelFile,
        AuthenticationError,
        PermissionDenied,
        ModelNotFound,
        RequestTooLarge,
        ContextLengthExceeded,
        QueueFull,
        ModelLoading,
        ModelCrashed,
        CrashedRecently,
        ModelFailed,
        InsufficientMemory,
        RayCannotFit,
        RayResourcesBusy,
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
    if isinstance(error, str):  # KServe v2's form: the message as a string, our code beside it
        error = {"message": error, "code": body.get("code")}
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
