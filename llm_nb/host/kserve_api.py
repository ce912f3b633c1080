"""KServe Open Inference Protocol v2 for classification-style models.

Requests carry text as a ``BYTES`` tensor, as in KServe's huggingfaceserve
examples. Answers are real tensors: class ids as ``INT64`` shaped
``[batch]`` (or ``[batch, tokens]``), scores as ``FP32`` shaped
``[batch, labels]`` when asked for, never a stringified dict.
Generative models stay on the OpenAI routes under ``/v1``.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from aiohttp import web

from ..errors import InvalidRequest
from .http import PRINCIPAL, read_json
from .loaded import LoadedModel
from .registry import Registry

routes = web.RouteTableDef()
INPUT_NAME = "input-0"


def registry_of(request: web.Request) -> Registry:
    return request.app["registry"]


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        out = []
        for item in data:
            out.extend(_flatten(item))
        return out
    return [data]


def parse_infer(body: Any) -> tuple[list[str], dict, str | None]:
    """The texts, merged parameters and request id of a v2 infer request, or a 400 that says why."""
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object with "inputs"')
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest('"inputs" must be a non-empty list of tensors')
    if len(inputs) != 1:
        raise InvalidRequest(f"this model takes one input tensor ({INPUT_NAME}), not {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise InvalidRequest("each input must be an object with name, shape, datatype and data")
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in tensor]
    if missing:
        raise InvalidRequest(f"input is missing {', '.join(missing)}")
    if tensor["datatype"] != "BYTES":
        raise InvalidRequest(f"input datatype must be BYTES (text), not {tensor['datatype']!r}")
    shape = tensor["shape"]
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidRequest("input shape must be a non-empty list of non-negative integers, like [2]")
    data = _flatten(tensor["data"])
    if math.prod(shape) != len(data):
        raise InvalidRequest(f"input shape {shape} holds {math.prod(shape)} elements but data has {len(data)}")
    if len(shape) > 1 and math.prod(shape[1:]) != 1:
        raise InvalidRequest(f"input shape {shape} must be [batch] or [batch, 1]: one text per row")
    if not data or not all(isinstance(text, str) for text in data):
        raise InvalidRequest("input data must be one or more strings")
    parameters: dict = {}
    for source in (body.get("parameters"), tensor.get("parameters")):
        if source is not None and not isinstance(source, dict):
            raise InvalidRequest("parameters must be an object")
        parameters.update(source or {})
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("id must be a string")
    return data, parameters, request_id


def _tensor(name: str, datatype: str, shape: list[int], data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _pad(rows: list[list], fill) -> tuple[list, int]:
    width = max((len(r) for r in rows), default=0)
    return [x for r in rows for x in (list(r) + [fill] * (width - len(r)))], width


def shape_outputs(result: dict, parameters: dict) -> list[dict]:
    """Worker results as v2 output tensors; scores, labels and tokens on request."""
    task = result["task"]
    want_scores = bool(parameters.get("return_scores"))
    want_labels = bool(parameters.get("return_labels"))
    if task == "text-classification":
        ids = result["label_ids"]
        outputs = [_tensor("output-0", "INT64", [len(ids)], ids)]
        if want_scores:
            outputs.append(
                _tensor(
                    "scores", "FP32", [len(ids), len(result["labels"])], [s for row in result["scores"] for s in row]
                )
            )
        if want_labels:
            outputs.append(_tensor("labels", "BYTES", [len(ids)], [result["labels"][i] for i in ids]))
        return outputs
    if task == "token-classification":
        batch = len(result["label_ids"])
        ids, width = _pad(result["label_ids"], -1)
        outputs = [_tensor("output-0", "INT64", [batch, width], ids)]
        if want_scores:
            outputs.append(_tensor("scores", "FP32", [batch, width], _pad(result["scores"], 0.0)[0]))
        if want_labels:
            labels = [[result["labels"][i] for i in row] for row in result["label_ids"]]
            outputs.append(_tensor("labels", "BYTES", [batch, width], _pad(labels, "")[0]))
        if parameters.get("return_tokens") or want_labels:
            outputs.append(_tensor("tokens", "BYTES", [batch, width], _pad(result["tokens"], "")[0]))
        return outputs
    top = result["top"]
    outputs = [_tensor("output-0", "BYTES", [len(top)], [ranked[0]["token"] for ranked in top])]
    if want_scores:
        k = len(top[0]) if top else 0
        outputs.append(_tensor("tokens", "BYTES", [len(top), k], [r["token"] for ranked in top for r in ranked]))
        outputs.append(_tensor("scores", "FP32", [len(top), k], [r["score"] for ranked in top for r in ranked]))
    return outputs


def _v2_model(request: web.Request) -> LoadedModel:
    name = request.match_info["name"]
    request[PRINCIPAL].require(name)
    registry = registry_of(request)
    model = registry.models.get(name)
    if model is None:
        registry.get(name)  # the model_not_found error, with its hint
    return model


def _output_meta(model: LoadedModel) -> list[dict]:
    task = model.spec.task
    if task == "text-classification":
        return [
            {"name": "output-0", "datatype": "INT64", "shape": [-1]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
        ]
    if task == "token-classification":
        return [
            {"name": "output-0", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "tokens", "datatype": "BYTES", "shape": [-1, -1]},
        ]
    if task == "fill-mask":
        return [{"name": "output-0", "datatype": "BYTES", "shape": [-1]}]
    return []


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    models = registry_of(request).models.values()
    is_ready = all(m.state == "ready" for m in models)
    return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)


@routes.get("/v2/models/{name}")
async def metadata(request: web.Request) -> web.Response:
    model = _v2_model(request)
    return web.json_response(
        {
            "name": model.spec.name,
            "versions": [],
            "platform": f"llm-nb/{model.spec.backend}",
            "task": model.spec.task or "text-generation",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}] if model.spec.task else [],
            "outputs": _output_meta(model),
            "labels": model.info.get("labels"),
        }
    )


@routes.get("/v2/models/{name}/ready")
async def model_ready(request: web.Request) -> web.Response:
    model = _v2_model(request)
    is_ready = model.state == "ready"
    return web.json_response({"name": model.spec.name, "ready": is_ready}, status=200 if is_ready else 503)


@routes.post("/v2/models/{name}/infer")
async def infer(request: web.Request) -> web.Response:
    registry = registry_of(request)
    name = request.match_info["name"]
    request[PRINCIPAL].require(name)
    model = registry.get(name)
    if not model.spec.task:
        raise InvalidRequest(
            f"{name!r} is a generative model: use the OpenAI routes, POST /v1/chat/completions or /v1/completions, "
            "not /v2 infer (as in KServe)"
        )
    texts, parameters, request_id = parse_infer(await read_json(request))
    async with model.queue.slot():
        model.touch()
        result = await model.runner.classify(texts, parameters)
    model.requests_served += 1
    return web.json_response(
        {
            "model_name": name,
            "model_version": None,
            "id": request_id or str(uuid.uuid4()),
            "parameters": {},
            "outputs": shape_outputs(result, parameters),
        }
    )
