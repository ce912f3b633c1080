"""Requests a remote engine answers itself: structured output, tools, logprobs and n, relayed unchanged.

The host serves these fields for its own models through llguidance and its
shaping; a remote engine (vLLM, llama.cpp's server, another llm-nb) has its own
implementation, so the request goes to it as the client wrote it (only
``model`` renamed) and its answer, whole or streamed, comes back with this
host's model name.
"""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from ..errors import LlmNbError
from .http import dumps, json_response, start_event_stream
from .loaded import LoadedModel
from .remote import RemoteEngine

#: Where a route keeps the request's JSON as the client sent it.
RAW_BODY = "llm_nb.openai_body"


def relayed(parsed, model: LoadedModel, passthrough: bool = True) -> bool:
    """Whether the model's engine answers this request as the client wrote it (its ``relays``)."""
    relays = getattr(model.runner, "relays", None)
    return bool(relays and relays(parsed, passthrough))


async def relay(request: web.Request, model: LoadedModel, parsed) -> web.StreamResponse:
    engine: RemoteEngine = model.runner
    body = request.get(RAW_BODY) or parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    path = "chat/completions" if "messages" in body else "completions"
    async with model.queue.slot():
        model.touch()
        async with engine.relay(path, body) as remote:
            if not parsed.stream:
                answer = await remote.json(content_type=None)
                if isinstance(answer, dict):
                    answer["model"] = model.spec.name
                model.requests_served += 1
                return json_response(answer)
            response = await start_event_stream(request)
            counted = False
            # An engine that serves the model under this host's name (vLLM) needs no renaming: its
            # chunks pass through as they came, unparsed.
            rename = engine.remote_model != model.spec.name
            try:
                async for line in remote.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]" and not counted:
                        # Counted before the client can see the end: the remote may hold
                        # its connection open a while after [DONE].
                        model.requests_served += 1
                        counted = True
                    if rename and data.startswith(b"{"):
                        chunk = json.loads(data)
                        if isinstance(chunk, dict) and "model" in chunk:
                            chunk["model"] = model.spec.name
                        data = dumps(chunk, ensure_ascii=False).encode()
                    await response.write(b"data: " + data + b"\n\n")
            except (LlmNbError, aiohttp.ClientError, TimeoutError) as exc:  # the engine died mid-stream: say so in-band
                error = await engine.lost(exc)
                await response.write(b"data: " + json.dumps(error.to_json()).encode() + b"\n\n")
            if not counted:
                model.requests_served += 1
            model.touch()
            await response.write_eof()
            return response
