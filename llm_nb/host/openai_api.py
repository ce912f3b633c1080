"""OpenAI-compatible routes under ``/v1``: models, chat, completions, embeddings.

The host shapes OpenAI answers from the runner's small event stream
(``{"text"}`` ... ``{"finish_reason", "prompt_tokens", "completion_tokens"}``),
so usage and finish_reason are exact, streamed or not, whether a worker or a
remote engine serves the model.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web

from ..config import heartbeat_interval
from ..errors import LlmNbError
from .http import HEARTBEAT, PRINCIPAL, read_json, with_heartbeats
from .loaded import LoadedModel
from .registry import Registry
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse

routes = web.RouteTableDef()


def registry_of(request: web.Request) -> Registry:
    return request.app["registry"]


async def generation_events(model: LoadedModel, payload: dict) -> AsyncIterator[dict]:
    """Wait for the model's queue, then yield the runner's events; counts the request."""
    async with model.queue.slot():
        model.touch()
        async for event in model.runner.generate(payload):
            yield event
        model.requests_served += 1
        model.touch()


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _usage(final: dict) -> dict:
    prompt, completion = final.get("prompt_tokens", 0), final.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Shaper:
    """Builds chat or text-completion objects, whole or as stream chunks."""

    def __init__(self, kind: str, model: str):
        self.kind = kind
        self.model = model
        self.created = int(time.time())
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, final: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(final),
        }

    def whole(self, text: str, final: dict) -> dict:
        if self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": final.get("finish_reason"),
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.get("finish_reason")}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(final),
        }


async def _respond(request: web.Request, kind: str, parsed) -> web.StreamResponse:
    registry = registry_of(request)
    model = registry.get(parsed.model)
    request[PRINCIPAL].require(model.spec.name)
    shaper = _Shaper(kind, model.spec.name)
    if not parsed.stream:
        return web.json_response(await _whole(shaper, generation_events(model, parsed.worker_request())))
    # Heartbeats while the request waits in the queue or the worker is busy: a reader whose host
    # goes silent for any reason can tell within seconds (its read timeout is a little above this).
    events = with_heartbeats(generation_events(model, parsed.worker_request()), heartbeat_interval())
    async with aclosing(events):
        first = await anext(events)  # queue full, context too long...: a plain error status, not a broken stream
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        if kind == "chat":
            await response.write(_sse(shaper.chunk(text="", role=True)))
        event = first
        try:
            while True:
                if event is HEARTBEAT:
                    await response.write(b": heartbeat\n\n")
                elif "text" in event:
                    await response.write(_sse(shaper.chunk(text=event["text"])))
                elif "error" in event:
                    await response.write(_sse(event))
                    return response
                else:
                    blank = "" if kind == "completion" else None
                    await response.write(_sse(shaper.chunk(text=blank, finish_reason=event.get("finish_reason"))))
                    if parsed.include_usage and "completion_tokens" in event:  # a remote may count none
                        await response.write(_sse(shaper.usage_chunk(event)))
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    break
        except LlmNbError as exc:  # the worker or remote died mid-stream: tell the client in-band
            await response.write(_sse(exc.to_json()))
            return response
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response


async def _whole(shaper: _Shaper, source: AsyncIterator[dict]) -> dict:
    """A whole (not streamed) answer from the runner's events."""
    parts, final = [], {}
    async with aclosing(source) as events:
        async for event in events:
            if "text" in event:
                parts.append(event["text"])
            elif "error" in event:
                raise LlmNbError(event["error"].get("message", "generation failed"), code=event["error"].get("code"))
            else:
                final = event
    return shaper.whole("".join(parts), final)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _respond(request, "chat", parse(ChatCompletionRequest, await read_json(request)))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _respond(request, "completion", parse(CompletionRequest, await read_json(request)))


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    parsed = parse(EmbeddingRequest, await read_json(request))
    model = registry_of(request).get(parsed.model)
    request[PRINCIPAL].require(model.spec.name)
    async with model.queue.slot():
        result = await model.runner.embed(parsed.inputs())
    model.requests_served += 1
    model.touch()
    data = []
    for index, vector in enumerate(result["data"]):
        if parsed.dimensions:
            vector = vector[: parsed.dimensions]
        if parsed.encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = result.get("prompt_tokens", 0)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": model.spec.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _model_card(model: LoadedModel) -> dict:
    return {
        "id": model.spec.name,
        "object": "model",
        "created": int(model.loaded_at or model.created),
        "owned_by": "llm-nb",
        "backend": model.spec.backend,
        "state": model.display_state,
    }


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    models = [m for m in registry_of(request).models.values() if request[PRINCIPAL].allows(m.spec.name)]
    return web.json_response({"object": "list", "data": [_model_card(m) for m in models]})


@routes.get("/v1/models/{name:.+}")
async def get_model(request: web.Request) -> web.Response:
    registry = registry_of(request)
    name = request.match_info["name"]
    model = registry.models.get(name)
    if model is None:
        registry.get(name)  # raises the model_not_found error with its hint
    request[PRINCIPAL].require(name)
    return web.json_response(_model_card(model))
