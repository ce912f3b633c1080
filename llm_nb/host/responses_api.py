"""``POST /v1/responses``: OpenAI's Responses API, answered by the chat machinery.

A request becomes a chat request (``responses_schema``), so the template, tools, grammar, queue,
budget and cancellation are the chat route's. The runner's events are read as chat reads them
(``Choice``: text, and the tool calls split out of it) and become *steps*: ``{"text"}`` to show,
``{"call"}`` per tool call, then the final ``{"finish_reason", "prompt_tokens", "completion_tokens"}``.
``ResponseBuilder`` turns steps into a ``response`` object and, for ``stream: true``, into the
Responses events the openai client's ``responses.stream`` accumulates::

    response.created, response.in_progress,
    response.output_item.added (message), response.content_part.added,
    response.output_text.delta ..., response.output_text.done, response.content_part.done,
    response.output_item.done,
    response.output_item.added (function_call), response.function_call_arguments.delta,
    response.function_call_arguments.done, response.output_item.done, ...
    response.completed | response.incomplete (cut by max_output_tokens) | response.failed

The host keeps no responses: every request carries its whole conversation in ``input``.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web

from ..config import heartbeat_interval
from ..errors import InvalidRequest, LlmNbError, RemoteError, error_from_json
from .http import HEARTBEAT, PRINCIPAL, dumps, json_response, may_load, read_json, start_event_stream, with_heartbeats
from .loaded import LoadedModel
from .openai_api import generation_events, registry_of
from .relay import relayed
from .remote import final_event
from .responses_schema import ResponsesRequest
from .schemas import ChatCompletionRequest, parse
from .shaping import Choice
from .structured import new_call_id, parse_calls

routes = web.RouteTableDef()

#: Where chat's checks point in a chat request, and the same place in a Responses request.
_CHAT_TO_RESPONSES_NAMES = (
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    (".function.parameters", ".parameters"),
)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


async def _served_model(request: web.Request, name: str) -> LoadedModel:
    """The model a request names, if its caller may use it (loaded on first use, as for chat)."""
    request[PRINCIPAL].require(name)  # before anything loads on its behalf
    return await registry_of(request).for_request(name, may_load(request))


def _worker_request(chat: ChatCompletionRequest) -> dict:
    """The worker request; a schema or tool that cannot compile is a 400 naming the Responses field."""
    try:
        return chat.worker_request()
    except InvalidRequest as exc:
        message, details = exc.message, dict(exc.details)
        for chat_name, name in _CHAT_TO_RESPONSES_NAMES:
            message = message.replace(chat_name, name)
            if isinstance(details.get("param"), str):
                details["param"] = details["param"].replace(chat_name, name)
        raise InvalidRequest(message, code=exc.code, **details) from None


def responses_usage(final: dict) -> dict | None:
    """Responses' usage from a final event; None when a remote engine counted nothing."""
    if "completion_tokens" not in final:
        return None
    prompt, completion = final.get("prompt_tokens", 0), final["completion_tokens"]
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


# --- steps: what a generation says, whoever serves it ---------------------------------------------
async def _local_steps(model: LoadedModel, chat: ChatCompletionRequest, payload: dict) -> AsyncIterator[dict]:
    """A worker's (or a plain remote's) events as steps; tool calls are read as chat reads them."""
    choice = Choice(0, chat.callable_tools()[0])
    final: dict = {}
    async with aclosing(generation_events(model, payload)) as events:
        async for event in events:
            if "error" in event:  # the worker failed mid-generation
                raise error_from_json(event, 500)
            if "text" not in event:
                final = event
            elif chat.stream:
                content, calls = choice.stream(event)
                if content:
                    yield {"text": content}
                for call in calls:
                    yield {"call": call}
            else:
                choice.add(event)
    # What waits for the end (the splitter's rest, a whole reply, the final event) goes out after
    # generation_events has counted the request: a client that has read the end may ask the status.
    if chat.stream:
        content, calls = choice.stream_end()
    else:
        # Whole, as chat reads a whole reply (which also knows calls written as bare JSON).
        text = "".join(choice.parts)
        content, calls = parse_calls(text, choice.tools) if choice.tools else (text, [])
    if content:
        yield {"text": content}
    for call in calls:
        yield {"call": call}
    yield final


async def _relayed_steps(model: LoadedModel, chat: ChatCompletionRequest) -> AsyncIterator[dict]:
    """A remote engine's whole chat answer as steps: it serves tools and formats itself, as ``relay`` says.

    Asked whole (exact usage from every OpenAI-compatible server); streamed, its steps come at the end.
    """
    body = dict(chat.model_dump(mode="json", by_alias=True, exclude_unset=True), stream=False)
    if "max_completion_tokens" in body:  # the name every OpenAI-compatible server knows, as remote.generate sends
        body["max_tokens"] = body.pop("max_completion_tokens")
    async with model.queue.slot():
        model.touch()
        async with model.runner.relay("chat/completions", body) as remote:
            answer = await remote.json(content_type=None)
        model.requests_served += 1
        model.touch()
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise RemoteError(f"the remote engine of {model.spec.name!r} answered no chat completion: {str(answer)[:200]}")
    message = choices[0].get("message") or {}
    if isinstance(message.get("content"), str) and message["content"]:
        yield {"text": message["content"]}
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        yield {
            "call": {
                "id": call.get("id") or new_call_id(),
                "type": "function",
                "function": {"name": function.get("name", ""), "arguments": function.get("arguments") or "{}"},
            }
        }
    usage = answer.get("usage")
    yield final_event(choices[0].get("finish_reason"), usage if isinstance(usage, dict) else None)


# --- the response, and its stream events ----------------------------------------------------------
class ResponseBuilder:
    """One ``response`` object, built step by step; each step returns the stream events it makes."""

    def __init__(self, model: str, echoed: dict):
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.model = model
        self.echoed = echoed
        self.status = "in_progress"
        self.output: list[dict] = []
        self.open_message: dict | None = None
        self.usage: dict | None = None
        self.error: dict | None = None
        self.incomplete_details: dict | None = None
        self.completed_at: int | None = None
        self.sequence = 0

    def response(self) -> dict:
        """The response object as it stands (a copy: later steps do not change what was sent)."""
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "completed_at": self.completed_at,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "model": self.model,
            "output": copy.deepcopy(self.output),
            "usage": self.usage,
            **self.echoed,
        }

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict]:
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def step(self, step: dict) -> list[dict]:
        if "text" in step:
            return self.text(step["text"])
        if "call" in step:
            return self.call(step["call"])
        return self.finish(step)

    def text(self, delta: str) -> list[dict]:
        events = self._open_message() if self.open_message is None else []
        message = self.open_message
        message["content"][0]["text"] += delta
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=message["id"],
                output_index=len(self.output) - 1,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def _open_message(self) -> list[dict]:
        message = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        self.output.append(message)
        self.open_message = message
        index = len(self.output) - 1
        events = [self._event("response.output_item.added", output_index=index, item=copy.deepcopy(message))]
        message["content"].append({"type": "output_text", "text": "", "annotations": []})
        events.append(
            self._event(
                "response.content_part.added",
                item_id=message["id"],
                output_index=index,
                content_index=0,
                part=copy.deepcopy(message["content"][0]),
            )
        )
        return events

    def _close_message(self, status: str) -> list[dict]:
        message, self.open_message = self.open_message, None
        if message is None:
            return []
        message["status"] = status
        part = message["content"][0]
        where = {"item_id": message["id"], "output_index": self.output.index(message), "content_index": 0}
        return [
            self._event("response.output_text.done", **where, text=part["text"], logprobs=[]),
            self._event("response.content_part.done", **where, part=copy.deepcopy(part)),
            self._event("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(message)),
        ]

    def call(self, call: dict) -> list[dict]:
        """A whole tool call: it closes the text before it, and goes out in one delta (as chat sends it)."""
        events = self._close_message("completed")
        arguments = call["function"]["arguments"]
        item = {
            "id": _new_id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": "",
        }
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        events.append(self._event("response.output_item.added", output_index=where["output_index"], item=dict(item)))
        events.append(self._event("response.function_call_arguments.delta", **where, delta=arguments))
        item.update(arguments=arguments, status="completed")
        events.append(self._event("response.function_call_arguments.done", **where, arguments=arguments))
        events.append(self._event("response.output_item.done", output_index=where["output_index"], item=dict(item)))
        return events

    def finish(self, final: dict) -> list[dict]:
        cut = final.get("finish_reason") == "length"
        # An empty reply is still a message: clients read output_text from one.
        events = self._open_message() if not self.output else []
        events += self._close_message("incomplete" if cut else "completed")
        self.usage = responses_usage(final)
        if cut:
            self.status, self.incomplete_details = "incomplete", {"reason": "max_output_tokens"}
        else:
            self.status, self.completed_at = "completed", int(time.time())
        events.append(self._event(f"response.{self.status}", response=self.response()))
        return events

    def fail(self, error: LlmNbError) -> list[dict]:
        """The generation broke mid-stream (a worker crash, a remote gone): the response failed, said in-band."""
        self.status = "failed"
        self.error = {"code": error.code, "message": error.message}
        for item in self.output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        return [self._event("response.failed", response=self.response())]


def _sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {dumps(event, ensure_ascii=False)}\n\n".encode()


async def _whole(builder: ResponseBuilder, steps: AsyncIterator[dict]) -> dict:
    async with aclosing(steps) as running:
        async for step in running:
            builder.step(step)  # the events are for streams
    return builder.response()


async def _stream(request: web.Request, builder: ResponseBuilder, steps: AsyncIterator[dict]) -> web.StreamResponse:
    # Heartbeats while the request waits in the queue or a call is being written: a reader can tell
    # a silent host within seconds, as on chat.
    events = with_heartbeats(steps, heartbeat_interval())
    async with aclosing(events):
        first = await anext(events)  # queue full, context too long...: a plain error status, not a broken stream
        response = await start_event_stream(request)
        for event in builder.start():
            await response.write(_sse(event))
        item = first
        try:
            while True:
                if item is HEARTBEAT:
                    await response.write(b": heartbeat\n\n")
                else:
                    for event in builder.step(item):
                        await response.write(_sse(event))
                try:
                    item = await anext(events)
                except StopAsyncIteration:
                    break
        except LlmNbError as exc:
            for event in builder.fail(exc):
                await response.write(_sse(event))
        await response.write_eof()
        return response


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    parsed = parse(ResponsesRequest, await read_json(request))
    model = await _served_model(request, parsed.model)
    chat = parsed.chat_request()
    if relayed(chat, model, passthrough=False):  # an engine with tools or a format: the engine serves them
        steps = _relayed_steps(model, chat)
    else:
        steps = _local_steps(model, chat, _worker_request(chat))  # the grammar is checked here: a 400 before queueing
    builder = ResponseBuilder(model.spec.name, parsed.echoed())
    if not parsed.stream:
        return json_response(await _whole(builder, steps))
    return await _stream(request, builder, steps)
