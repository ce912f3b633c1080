"""Reading an OpenAI-style server-sent-event stream, the same way for every kernel-side reader.

``sse_event(line)`` turns one line into a chunk (a dict), ``DONE`` or None (a
comment such as the host's heartbeat, a blank line, an ``event:`` line), and
``Reply`` gathers what a stream said: text, usage, finish reason, time to the
first token. ``text_pieces`` and ``atext_pieces`` are the one loop over a
stream's lines, sync and async; the clients, ``deployment.HostModel``,
``consume.fire`` and the server extension's status reader all read through
this module, so they agree on what a finished reply is.

The load and deploy routes answer with newline-delimited JSON progress events
instead (``progress_answer``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator

from .errors import error_from_json

DONE = object()


def sse_event(raw: bytes | str) -> dict | object | None:
    """A ``data:`` line's JSON, ``DONE`` for ``data: [DONE]``, None for anything else (comments, heartbeats)."""
    line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    return json.loads(data)


class Reply:
    """What a stream of chat or completion chunks said so far."""

    def __init__(self, started: float | None = None):
        self.started = started if started is not None else time.perf_counter()
        self.parts: list[str] = []
        #: OpenAI ``message.tool_calls``, reassembled from the ``delta.tool_calls`` pieces (arguments a JSON string).
        self.tool_calls: list[dict] = []
        self.usage: dict | None = None
        self.finish_reason: str | None = None
        self.first_token_s: float | None = None
        self.elapsed_s: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, chunk: dict) -> str:
        """Take one chunk; return its text ("" if none). An in-band error chunk raises it."""
        if "error" in chunk:
            raise error_from_json(chunk, 500)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        text = ""
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            delta = choice.get("delta") or {}
            text += delta.get("content") or choice.get("text") or ""
            for piece in delta.get("tool_calls") or []:
                self._take_tool_call(piece)
        if self.first_token_s is None and (text or self.tool_calls):
            self.first_token_s = time.perf_counter() - self.started
        if text:
            self.parts.append(text)
        return text

    def _take_tool_call(self, piece: dict) -> None:
        """One ``delta.tool_calls`` entry: the first names the call, the next ones add to its arguments."""
        index = piece.get("index", len(self.tool_calls))
        while len(self.tool_calls) <= index:
            self.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = self.tool_calls[index]
        call["id"] = piece.get("id") or call["id"]
        function = piece.get("function") or {}
        call["function"]["name"] = function.get("name") or call["function"]["name"]
        call["function"]["arguments"] += function.get("arguments") or ""

    def take_line(self, raw: bytes | str) -> str | None:
        """Take one line of the stream: its text ("" for none, or a heartbeat), None once it says ``[DONE]``."""
        event = sse_event(raw)
        if event is DONE:
            return None
        return self.feed(event) if event is not None else ""

    def end(self) -> None:
        self.elapsed_s = time.perf_counter() - self.started


def text_pieces(lines: Iterable[bytes | str], reply: Reply) -> Iterator[str]:
    """Yield the text of each chunk of an SSE stream into ``reply``, up to ``[DONE]``; heartbeats yield nothing."""
    for raw in lines:
        piece = reply.take_line(raw)
        if piece is None:
            return
        if piece:
            yield piece


async def atext_pieces(lines: AsyncIterable[bytes], reply: Reply) -> AsyncIterator[str]:
    """``text_pieces`` for an async stream (an aiohttp response's ``content``)."""
    async for raw in lines:
        piece = reply.take_line(raw)
        if piece is None:
            return
        if piece:
            yield piece


def progress_answer(line: bytes | str, on_progress: Callable[[dict], None] | None) -> dict | None:
    """One line of a load or deploy stream: progress is handed on, an error raised, the answer returned.

    Blank lines are the host's heartbeats.
    """
    event = json.loads(line) if line.strip() else {}
    if event.get("event") == "progress":
        if on_progress is not None:
            on_progress(event)
    elif event.get("event") == "error":
        raise error_from_json(event, event.get("status", 500))
    elif event.get("event") == "done":
        return {k: v for k, v in event.items() if k != "event"}
    return None


class ReplyView:
    """What a stream said so far, read through its ``reply``: a partial reply stays readable after an error."""

    reply: Reply

    parts = property(lambda self: self.reply.parts)
    usage = property(lambda self: self.reply.usage)
    finish_reason = property(lambda self: self.reply.finish_reason)
    started = property(lambda self: self.reply.started)
    first_token_s = property(lambda self: self.reply.first_token_s)
    elapsed_s = property(lambda self: self.reply.elapsed_s)
    text = property(lambda self: self.reply.text)
    tool_calls = property(lambda self: self.reply.tool_calls)
