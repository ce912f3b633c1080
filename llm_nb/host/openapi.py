"""The host's OpenAPI description, built from the same pydantic models that validate requests.

Served at ``GET /openapi.json`` (behind the key like every other route), so
tools such as schemathesis can fuzz every route from it.
"""

from __future__ import annotations

import re

from aiohttp import web
from pydantic import BaseModel

from .._version import __version__
from .http import PUBLIC_PATHS, is_v2_path, json_response
from .responses_schema import ResponsesRequest
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DeployRequest,
    EmbeddingRequest,
    InferRequest,
    LoadRequest,
    PredictPayload,
    TokenRequest,
    UndeployRequest,
    UnloadRequest,
    UseModelRequest,
)

routes = web.RouteTableDef()

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"}},
        }
    },
}
#: KServe v2's error: the message as a string (our stable code beside it).
_V2_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
}
_ANY_OBJECT = {"type": "object"}

# (method, path, request model or None, success media type, error statuses, summary)
ROUTES: list[tuple[str, str, type[BaseModel] | None, str, tuple[int, ...], str]] = [
    ("get", "/health", None, "application/json", (), "liveness; needs no key"),
    ("get", "/api/status", None, "application/json", (401,), "loaded models, leases, memory, deployments"),
    ("get", "/api/catalog", None, "application/json", (401,), "catalog aliases"),
    ("post", "/api/models/load", LoadRequest, "application/json", (400, 401, 404, 413, 500, 507), "load or attach"),
    ("post", "/api/models/unload", UnloadRequest, "application/json", (400, 401, 404, 413), "release a lease"),
    ("get", "/v1/models", None, "application/json", (401,), "OpenAI: loaded models"),
    ("get", "/v1/models/{name}", None, "application/json", (401, 403, 404), "OpenAI: one loaded model"),
    (
        "post",
        "/v1/chat/completions",
        ChatCompletionRequest,
        "application/json",
        (400, 401, 404, 413, 422, 429, 502, 503),
        "OpenAI chat",
    ),
    (
        "post",
        "/v1/completions",
        CompletionRequest,
        "application/json",
        (400, 401, 404, 413, 422, 429, 502, 503),
        "OpenAI completions",
    ),
    (
        "post",
        "/v1/responses",
        ResponsesRequest,
        "application/json",
        (400, 401, 403, 404, 413, 422, 429, 502, 503),
        "OpenAI Responses (no stored responses: send the conversation in input)",
    ),
    (
        "post",
        "/v1/embeddings",
        EmbeddingRequest,
        "application/json",
        (400, 401, 404, 413, 429, 503),
        "OpenAI embeddings",
    ),
    ("get", "/v2", None, "application/json", (401,), "KServe v2: server metadata and extensions"),
    ("get", "/v2/health/live", None, "application/json", (), "KServe v2: liveness; needs no key"),
    ("get", "/v2/health/ready", None, "application/json", (503,), "KServe v2: every model ready; needs no key"),
    ("get", "/v2/models/{name}", None, "application/json", (401, 403, 404), "KServe v2: model metadata"),
    (
        "get",
        "/v2/models/{name}/versions/{version}",
        None,
        "application/json",
        (401, 403, 404),
        "KServe v2: model metadata (version 1)",
    ),
    ("get", "/v2/models/{name}/ready", None, "application/json", (401, 403, 404, 503), "KServe v2: model readiness"),
    (
        "get",
        "/v2/models/{name}/versions/{version}/ready",
        None,
        "application/json",
        (401, 403, 404, 503),
        "KServe v2: model readiness (version 1)",
    ),
    (
        "post",
        "/v2/models/{name}/infer",
        InferRequest,
        "application/json",
        (400, 401, 403, 404, 413, 429, 502, 503),
        "KServe v2: infer; binary tensor data when Inference-Header-Content-Length is set",
    ),
    (
        "post",
        "/v2/models/{name}/versions/{version}/infer",
        InferRequest,
        "application/json",
        (400, 401, 403, 404, 413, 429, 502, 503),
        "KServe v2: infer (version 1)",
    ),
    ("get", "/api/models/{name}/logs", None, "text/plain", (401, 404), "a model worker's log"),
    ("get", "/openapi.json", None, "application/json", (401,), "this document"),
    ("post", "/api/token", TokenRequest, "application/json", (400, 401, 403, 413), "mint a session token"),
    ("get", "/api/deployments", None, "application/json", (401,), "deployments"),
    (
        "post",
        "/api/deployments/deploy",
        DeployRequest,
        "application/json",
        (400, 401, 403, 404, 413, 500, 507),
        "deploy",
    ),
    ("post", "/api/deployments/undeploy", UndeployRequest, "application/json", (400, 401, 403, 404, 413), "undeploy"),
    ("get", "/api/deployments/{name}/logs", None, "text/plain", (401, 403, 404), "a deployment worker's log"),
    (
        "post",
        "/api/deployments/{name}/use",
        UseModelRequest,
        "application/json",
        (400, 401, 403, 404, 413, 507),
        "a lease on a host model for a deployment's model.py",
    ),
    (
        "get",
        "/models/{name}/",
        None,
        "application/json",
        (400, 401, 403, 404, 502, 503),
        "a deployment: meta or predict",
    ),
    (
        "post",
        "/models/{name}/",
        PredictPayload,
        "application/json",
        (400, 401, 403, 404, 413, 429, 502, 503),
        "a deployment: predict with a JSON payload",
    ),
]
#: Left out on purpose: /api/events (a server-sent-events stream that ends only with the
#: host) and /api/shutdown (it stops the host).
LEFT_OUT = {("get", "/api/events"), ("post", "/api/shutdown")}
#: Paths that serve the same API as a documented one: a deployment's answers with or without its slash.
SAME_AS = {"/models/{name}": "/models/{name}/"}


def build_openapi(extra_routes: list | None = None) -> dict:
    components: dict = {"Error": _ERROR, "V2Error": _V2_ERROR}
    paths: dict = {}
    for method, path, model, media, errors, summary in ROUTES + list(extra_routes or []):
        operation: dict = {
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {"200": {"description": "success", "content": {media: {"schema": _ANY_OBJECT}}}},
        }
        error_schema = "V2Error" if is_v2_path(path) else "Error"
        for status in errors:
            operation["responses"][str(status)] = {
                "description": "error",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error_schema}"}}},
            }
        if model is not None:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        if names := re.findall(r"\{(\w+)\}", path):
            operation["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names
            ]
        if path not in PUBLIC_PATHS:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "llm-nb host", "version": __version__},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return json_response(build_openapi(request.app.get("openapi_routes")))
