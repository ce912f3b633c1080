"""KServe Open Inference Protocol v2 for classification-style models.

Requests carry text as a ``BYTES`` tensor, as in KServe's huggingfaceserve
examples, in JSON or in the binary tensor data extension (``kserve_codec``).
Answers are real tensors: class ids as ``INT64`` shaped ``[batch]`` (or
``[batch, tokens]``), scores as ``FP32`` shaped ``[batch, labels]``, never a
stringified dict; ``outputs`` picks which come back, and which in binary.
Every model is served as version ``"1"``. Generative models stay on the OpenAI
routes under ``/v1``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .._version import __version__
from ..errors import InvalidRequest, ModelNotFound
from .http import PRINCIPAL, json_response, may_load, read_body, read_json
from .kserve_codec import HEADER, MEDIA_TYPE, decode_inputs, encode_response, split_body
from .loaded import LoadedModel
from .registry import Registry

routes = web.RouteTableDef()
INPUT_NAME = "input-0"
MODEL_VERSION = "1"
#: What ``GET /v2`` says this server speaks beyond the core protocol.
EXTENSIONS = ["binary_tensor_data"]
#: Parameters of the binary extension: read here, never passed on to a model.
_EXTENSION_PARAMETERS = ("binary_data_output", "binary_data_size")

#: The outputs each task can answer, as model metadata lists them; ``outputs`` names some of these.
OUTPUTS: dict[str, list[dict]] = {
    "text-classification": [
        {"name": "output-0", "datatype": "INT64", "shape": [-1]},
        {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "labels", "datatype": "BYTES", "shape": [-1]},
    ],
    "token-classification": [
        {"name": "output-0", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
        {"name": "tokens", "datatype": "BYTES", "shape": [-1, -1]},
    ],
    "fill-mask": [
        {"name": "output-0", "datatype": "BYTES", "shape": [-1]},
        {"name": "tokens", "datatype": "BYTES", "shape": [-1, -1]},
        {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
    ],
}


def registry_of(request: web.Request) -> Registry:
    return request.app["registry"]


@dataclass
class InferCall:
    """A parsed v2 infer request: what to run, and what to send back how."""

    texts: list[str]
    parameters: dict
    request_id: str | None
    outputs: list[str]
    binary: set[str] = field(default_factory=set)


def _flatten(data: Any) -> list:
    """Nested lists' leaves in row-major order; a loop, as JSON nests deeper than Python recurses."""
    out: list = []
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def parse_infer(body: Any, task: str) -> InferCall:
    """A v2 infer request for a ``task`` model, or a 400 that says what is wrong with it."""
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
    tensor_parameters = tensor.get("parameters")
    if "data" in missing and isinstance(tensor_parameters, dict) and "binary_data_size" in tensor_parameters:
        raise InvalidRequest(
            f"input has parameters.binary_data_size but the request has no {HEADER} header; "
            "set it to the length of the JSON part of the body"
        )
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
    for source in (body.get("parameters"), tensor_parameters):
        if source is not None and not isinstance(source, dict):
            raise InvalidRequest("parameters must be an object")
        parameters.update(source or {})
    binary_default = (body.get("parameters") or {}).get("binary_data_output", False)  # a request-level parameter
    if not isinstance(binary_default, bool):
        raise InvalidRequest(f"parameters.binary_data_output must be true or false, not {binary_default!r}")
    for key in _EXTENSION_PARAMETERS:
        parameters.pop(key, None)
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("id must be a string")
    outputs, binary = _requested_outputs(body.get("outputs"), task, parameters, binary_default)
    return InferCall(data, parameters, request_id, outputs, binary)


def _default_outputs(task: str, parameters: dict) -> list[str]:
    """What comes back when ``outputs`` names nothing: ``output-0``, and more on the older ``return_*`` flags."""
    scores, labels = bool(parameters.get("return_scores")), bool(parameters.get("return_labels"))
    names = ["output-0"]
    if task == "fill-mask":
        return names + (["tokens", "scores"] if scores else [])
    names += ["scores"] * scores + ["labels"] * labels
    if task == "token-classification" and (parameters.get("return_tokens") or labels):
        names.append("tokens")
    return names


def _requested_outputs(requested: Any, task: str, parameters: dict, binary_default: bool) -> tuple[list, set]:
    """The output names to answer, in order, and those to answer in binary."""
    if requested is None or requested == []:
        names = _default_outputs(task, parameters)
        return names, set(names) if binary_default else set()
    if not isinstance(requested, list):
        raise InvalidRequest('"outputs" must be a list of objects like {"name": "scores"}')
    available = [o["name"] for o in OUTPUTS[task]]
    names: list[str] = []
    binary: set[str] = set()
    for output in requested:
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest('each of "outputs" must be an object with a "name", like {"name": "scores"}')
        if name not in available:
            raise InvalidRequest(f"a {task} model has no output {name!r}; its outputs are {', '.join(available)}")
        if name in names:
            raise InvalidRequest(f"output {name!r} is asked for twice")
        options = output.get("parameters") or {}
        if not isinstance(options, dict):
            raise InvalidRequest(f"output {name!r}: parameters must be an object")
        if "classification" in options:
            raise InvalidRequest(
                "the classification extension is not served here; ask for the scores and labels outputs instead"
            )
        as_binary = options.get("binary_data", binary_default)
        if not isinstance(as_binary, bool):
            raise InvalidRequest(f"output {name!r}: parameters.binary_data must be true or false, not {as_binary!r}")
        names.append(name)
        if as_binary:
            binary.add(name)
    return names, binary


def _tensor(name: str, datatype: str, shape: list[int], data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _pad(rows: list[list], fill) -> tuple[list, int]:
    width = max((len(r) for r in rows), default=0)
    return [x for r in rows for x in (list(r) + [fill] * (width - len(r)))], width


def _builders(result: dict) -> dict[str, Callable[[], dict]]:
    """Each output of ``result``'s task, built only when called, so unasked outputs cost nothing."""
    task = result["task"]
    if task == "text-classification":
        ids, labels = result["label_ids"], result["labels"]
        return {
            "output-0": lambda: _tensor("output-0", "INT64", [len(ids)], ids),
            "scores": lambda: _tensor(
                "scores", "FP32", [len(ids), len(labels)], [s for row in result["scores"] for s in row]
            ),
            "labels": lambda: _tensor("labels", "BYTES", [len(ids)], [labels[i] for i in ids]),
        }
    if task == "token-classification":
        rows, batch = result["label_ids"], len(result["label_ids"])

        def padded(name: str, datatype: str, values: list[list], fill) -> dict:
            flat, width = _pad(values, fill)
            return _tensor(name, datatype, [batch, width], flat)

        return {
            "output-0": lambda: padded("output-0", "INT64", rows, -1),
            "scores": lambda: padded("scores", "FP32", result["scores"], 0.0),
            "labels": lambda: padded("labels", "BYTES", [[result["labels"][i] for i in row] for row in rows], ""),
            "tokens": lambda: padded("tokens", "BYTES", result["tokens"], ""),
        }
    top = result["top"]
    k = len(top[0]) if top else 0
    return {
        "output-0": lambda: _tensor("output-0", "BYTES", [len(top)], [ranked[0]["token"] for ranked in top]),
        "tokens": lambda: _tensor("tokens", "BYTES", [len(top), k], [r["token"] for ranked in top for r in ranked]),
        "scores": lambda: _tensor("scores", "FP32", [len(top), k], [r["score"] for ranked in top for r in ranked]),
    }


def shape_outputs(result: dict, names: list[str]) -> list[dict]:
    """Worker results as the v2 output tensors ``names``, in that order."""
    builders = _builders(result)
    return [builders[name]() for name in names]


async def _v2_model(request: web.Request, *, serving: bool = False) -> LoadedModel:
    """The model (and version) a /v2 route names; every /v2 model lookup goes through here.

    ``serving``: it must be ready to answer: a catalog model nobody loaded loads on this
    first request, and one that is loading is waited for (``Registry.for_request``);
    metadata and readiness see a model in any state and load nothing.
    """
    name = request.match_info["name"]
    request[PRINCIPAL].require(name)
    version = request.match_info.get("version")
    if version is not None and version != MODEL_VERSION:
        raise ModelNotFound(
            f"model {name!r} has one version, {MODEL_VERSION!r}; there is no version {version!r}",
            code="model_version_not_found",
        )
    registry = registry_of(request)
    if serving:
        return await registry.for_request(name, may_load(request))
    # registry.get raises model_not_found, with a hint.
    return registry.models.get(name) or registry.get(name)


async def _read_infer_body(request: web.Request) -> Any:
    """The infer request as JSON, its binary inputs decoded into ``data`` when it uses the binary extension."""
    header_length = request.headers.get(HEADER)
    if header_length is None:
        return await read_json(request)
    header, blob = split_body(await read_body(request), header_length)
    decode_inputs(header, blob)
    return header


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": "llm-nb", "version": __version__, "extensions": EXTENSIONS})


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    models = registry_of(request).models.values()
    is_ready = all(m.state == "ready" for m in models)
    return json_response({"ready": is_ready}, status=200 if is_ready else 503)


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def metadata(request: web.Request) -> web.Response:
    model = await _v2_model(request)
    task = model.spec.task
    return json_response(
        {
            "name": model.spec.name,
            "versions": [MODEL_VERSION],
            "platform": f"llm-nb/{model.spec.backend}",
            "task": task or "text-generation",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}] if task else [],
            "outputs": OUTPUTS.get(task or "", []),
            "labels": model.info.get("labels"),
        }
    )


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    model = await _v2_model(request)
    is_ready = model.state == "ready"
    return json_response({"name": model.spec.name, "ready": is_ready}, status=200 if is_ready else 503)


@routes.post("/v2/models/{name}/infer")
@routes.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    model = await _v2_model(request, serving=True)
    name = request.match_info["name"]
    if not model.spec.task:
        raise InvalidRequest(
            f"{name!r} is a generative model: use the OpenAI routes, POST /v1/chat/completions or /v1/completions, "
            "not /v2 infer (as in KServe)"
        )
    call = parse_infer(await _read_infer_body(request), model.spec.task)
    async with model.queue.slot():
        model.touch()
        result = await model.runner.classify(call.texts, call.parameters)
    model.requests_served += 1
    answer = {
        "model_name": name,
        "model_version": MODEL_VERSION,
        "id": call.request_id or str(uuid.uuid4()),
        "parameters": {},
        "outputs": shape_outputs(result, call.outputs),
    }
    if not call.binary:
        return json_response(answer)
    body, header_length = encode_response(answer, call.binary)
    return web.Response(body=body, content_type=MEDIA_TYPE, headers={HEADER: str(header_length)})
