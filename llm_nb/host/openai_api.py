"""OpenAI-compatible routes under ``/v1``: models, chat, completions, embeddings.

The host shapes OpenAI answers from the runner's small event stream
(``{"text"}`` ... ``{"finish_reason", "prompt_tokens", "completion_tokens"}``),
so usage and finish_reason are exact, streamed or not, whether a worker or a
remote engine serves the model.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web

from ..catalog import catalog_entries
from ..config import heartbeat_interval
from ..errors import InvalidRequest, LlmNbError
from .http import HEARTBEAT, PRINCIPAL, dumps, json_response, may_load, read_json, start_event_stream, with_heartbeats
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
            if event.get("prompt_cache") is not None:  # a finish event: the cache's figures now
                model.info["prompt_cache"] = event["prompt_cache"]
            yield event
        model.requests_served += 1
        model.touch()


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else dumps(data, ensure_ascii=False)
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
    if parsed.model:  # before anything loads on its behalf
        request[PRINCIPAL].require(parsed.model)
    model = await registry_of(request).for_request(parsed.model, may_load(request))
    if relayed(parsed, model):  # a remote engine answers these fields itself
        return await relay(request, model, parsed)
    tools = parsed.callable_tools()[0] if kind == "chat" else []
    shaper = Shaper(kind, model.spec.name)
    choices = [Choice(i, tools) for i in range(parsed.n)]
    sources = [generation_events(model, payload) for payload in _payloads(parsed)]
    if not parsed.stream:
        return json_response(await _whole(shaper, choices, merged(sources)))
    # Heartbeats while the request waits in the queue or the worker is busy: a reader whose host
    # goes silent for any reason can tell within seconds (its read timeout is a little above this).
    events = with_heartbeats(merged(sources), heartbeat_interval())
    async with aclosing(events):
        first = await anext(events)  # queue full, context too long...: a plain error status, not a broken stream
        response = await start_event_stream(request)
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
    if parsed.model:
        request[PRINCIPAL].require(parsed.model)
    model = await registry_of(request).for_request(parsed.model, may_load(request))
    length = model.info.get("embedding_length")
    if parsed.dimensions and length and parsed.dimensions > length:
        raise _too_many_dimensions(parsed.dimensions, model.spec.name, length)
    async with model.queue.slot():
        result = await model.runner.embed(parsed.inputs())
    model.requests_served += 1
    model.touch()
    data = []
    for index, vector in enumerate(result["data"]):
        if parsed.dimensions:
            if parsed.dimensions > len(vector):  # a remote model, whose length is known only now
                raise _too_many_dimensions(parsed.dimensions, model.spec.name, len(vector))
            vector = _unit(vector[: parsed.dimensions])
        if parsed.encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = result.get("prompt_tokens", 0)
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": model.spec.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _too_many_dimensions(asked: int, name: str, length: int) -> InvalidRequest:
    return InvalidRequest(f"dimensions={asked} is more than {name!r} makes: its embeddings have {length}")


def _unit(vector: list[float]) -> list[float]:
    """A shortened embedding scaled back to length 1, as OpenAI's are (cosine = dot product)."""
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _model_card(model: LoadedModel) -> dict:
    return {
        "id": model.spec.name,
        "object": "model",
        "created": int(model.loaded_at or model.created),
        "owned_by": "llm-nb",
        "backend": model.spec.backend,
        "state": model.display_state,
    }


def _catalog_cards(registry: Registry) -> dict[str, dict]:
    """Catalog models nobody loaded, which a request loads on first use: tools that list models can pick them."""
    if not registry.settings.load_on_request:
        return {}
    try:
        entries = catalog_entries(registry.settings.catalog_file)
    except LlmNbError:  # a broken catalog file: /api/catalog says why; the loaded models still list
        return {}
    return {
        name: {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "llm-nb",
            "backend": entry.get("backend") or "llamacpp",
            "state": "available",
        }
        for name, entry in entries.items()
        if name not in registry.models
    }


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    registry = registry_of(request)
    cards = [_model_card(m) for m in registry.models.values()]
    cards += (await asyncio.to_thread(_catalog_cards, registry)).values()
    allowed = [card for card in cards if request[PRINCIPAL].allows(card["id"])]
    return json_response({"object": "list", "data": allowed})


@routes.get("/v1/models/{name:.+}")
async def get_model(request: web.Request) -> web.Response:
    registry = registry_of(request)
    name = request.match_info["name"]
    request[PRINCIPAL].require(name)
    model = registry.models.get(name)
    if model is not None:
        return json_response(_model_card(model))
    card = (await asyncio.to_thread(_catalog_cards, registry)).get(name)
    if card is None:
        registry.get(name)  # raises the model_not_found error with its hint
    return json_response(card)
