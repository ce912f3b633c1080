"""Where a consumer's requests go, and with what credential: URLs, protocols, session tokens, one-off calls."""

from __future__ import annotations

import base64
import json
import random
import time
import urllib.parse
from typing import Any, Literal

import requests

from ..connection import connection_path, read_connection
from ..errors import AuthenticationError, InvalidRequest, LlmNbError
from ..transport import error_answer

Protocol = Literal["auto", "openai", "practicus", "kserve-v2"]
PROTOCOLS = ("openai", "practicus", "kserve-v2")
RETRY_STATUSES = frozenset({429, 503})
TOKEN_REUSE_MARGIN_S = 60.0


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
    from ..client import Client

    try:
        return Client.at(_origin(api_url), key, timeout=timeout).session_token(scope, ttl)["token"]
    except LlmNbError as exc:
        if exc.status in (404, 405) and api_key:
            return api_key  # not an llm-nb host: its key is the credential
        raise


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
            raise error_answer(response.status_code, response.content)
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
