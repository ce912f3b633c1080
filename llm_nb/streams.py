"""Reading an OpenAI-style server-sent-event stream, the same way for every kernel-side reader.

``sse_event(line)`` turns one line into a chunk (a dict), ``DONE`` or None (a
comment such as the host's heartbeat, a blank line, an ``event:`` line), and
``Reply`` gathers what a stream said: text, usage, finish reason, time to the
first token. The sync client, the async client and ``consume.fire`` read
through these, so they agree on what a finished reply is.
"""

from __future__ import annotations

import json
import time

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
            text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        if text:
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.started
            self.parts.append(text)
        return text

    def take_line(self, raw: bytes | str) -> str | None:
        """Take one line of the stream: its text ("" for none, or a heartbeat), None once it says ``[DONE]``."""
        event = sse_event(raw)
        if event is DONE:
            return None
        return self.feed(event) if event is not None else ""

    def end(self) -> None:
        self.elapsed_s = time.perf_counter() - self.started


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
