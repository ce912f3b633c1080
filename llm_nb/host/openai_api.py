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
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web

from ..config import heartbeat_interval
from ..errors import LlmNbError
from .http import HEARTBEAT, PRINCIPAL, read_json, with_heartbeats
from .loaded import LoadedModel
from .registry import Registry
from .relay import RAW_BODY, relay, relayed
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse
from .shaping import Choice, Shaper, merged

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


def _payloads(parsed) -> list[dict]:
    """One worker request per choice; a seed, if given, differs per choice so the choices differ."""
    payload = parsed.worker_request()  # builds and checks the grammar: a 400 before anything is queued
    payloads = []
    for index in range(parsed.n):
        one = dict(payload)
        if index and one.get("seed") is not None:
            one["seed"] = (one["seed"] + index) % 2**64
        payloads.append(one)
    return payloads


async def _respond(request: web.Request, kind: str, parsed) -> web.StreamResponse:
    registry = registry_of(request)
    model = registry.get(parsed.model)
    request[PRINCIPAL].require(model.spec.name)
    if relayed(parsed, model):  # a remote engine answers these fields itself
        return await relay(request, model, parsed)
    tools = parsed.callable_tools()[0] if kind == "chat" else []
    shaper = Shaper(kind, model.spec.name)
    choices = [Choice(i, tools) for i in range(parsed.n)]
    sources = [generation_events(model, payload) for payload in _payloads(parsed)]
    if not parsed.stream:
        return web.json_response(await _whole(shaper, choices, merged(sources)))
    # Heartbeats while the request waits in the queue or the worker is busy: a reader whose host
    # goes silent for any reason can tell within seconds (its read timeout is a little above this).
    events = with_heartbeats(merged(sources), heartbeat_interval())
    async with aclosing(events):
        first = await anext(events)  # queue full, context too long...: a plain error status, not a broken stream
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        if kind == "chat":
            for choice in choices:
                await response.write(_sse(shaper.chunk(choice.index, text="", role=True)))
        item = first
        try:
            while True:
                if item is HEARTBEAT:
                    await response.write(b": heartbeat\n\n")
                else:
                    index, event = item
                    if "error" in event:
                        await response.write(_sse(event))
                        return response
                    await _write_event(response, shaper, choices[index], event)
                try:
                    item = await anext(events)
                except StopAsyncIteration:
                    break
        except LlmNbError as exc:  # the worker or remote died mid-stream: tell the client in-band
            await response.write(_sse(exc.to_json()))
            return response
        if parsed.include_usage and all("completion_tokens" in c.final for c in choices):  # a remote may count none
            await response.write(_sse(shaper.usage_chunk([c.final for c in choices])))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response


async def _write_event(response: web.StreamResponse, shaper: Shaper, choice: Choice, event: dict) -> None:
    """One runner event of one choice, as the chunks it makes."""
    index = choice.index
    if "text" in event:
        content, calls = choice.stream(event)
        if content or event.get("logprobs"):
            chunk = shaper.chunk(index, text=content, logprobs=event.get("logprobs"), offset=choice.streamed_chars)
            await response.write(_sse(chunk))
        choice.streamed_chars += len(event["text"])
        await _write_calls(response, shaper, choice, calls)
        return
    choice.final = event
    content, calls = choice.stream_end()
    if content:
        await response.write(_sse(shaper.chunk(index, text=content)))
    await _write_calls(response, shaper, choice, calls)
    blank = "" if shaper.kind == "completion" else None
    await response.write(_sse(shaper.chunk(index, text=blank, finish_reason=choice.finish_reason())))


async def _write_calls(response: web.StreamResponse, shaper: Shaper, choice: Choice, calls: list[dict]) -> None:
    # Each call goes out whole, in one delta, once it has closed: the openai client's
    # accumulator takes a call in one piece as well as in many.
    for call in calls:
        position = choice.calls.index(call)
        await response.write(_sse(shaper.chunk(choice.index, tool_calls=[dict(call, index=position)])))


async def _whole(shaper: Shaper, choices: list[Choice], source: AsyncIterator[tuple[int, dict]]) -> dict:
    """A whole (not streamed) answer from the runners' events."""
    async with aclosing(source) as events:
        async for index, event in events:
            if "text" in event:
                choices[index].add(event)
            elif "error" in event:
                raise LlmNbError(event["error"].get("message", "generation failed"), code=event["error"].get("code"))
            else:
                choices[index].final = event
    return shaper.whole(choices)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    request[RAW_BODY] = body  # a remote engine gets the request as sent (relay)
    return await _respond(request, "chat", parse(ChatCompletionRequest, body))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    request[RAW_BODY] = body
    return await _respond(request, "completion", parse(CompletionRequest, body))


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
