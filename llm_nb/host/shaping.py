"""OpenAI answers shaped from runner events: chat and text completions, whole or streamed, n choices.

A runner yields ``{"text", "logprobs"?}`` events and a final ``{"finish_reason",
"prompt_tokens", "completion_tokens"}``. ``Choice`` gathers one choice's events
(reading tool calls out of its text when tools were offered); ``Shaper`` writes
the objects the ``openai`` client reads.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from .structured import CallSplitter, parse_calls


def usage_of(finals: list[dict]) -> dict:
    """Usage over all choices: the prompt once (it was the same prompt), completions summed."""
    prompt = max((f.get("prompt_tokens", 0) for f in finals), default=0)
    completion = sum(f.get("completion_tokens", 0) for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def legacy_logprobs(entries: list[dict], start: int = 0) -> dict:
    """``/v1/completions``' older logprobs shape, from the per-token entries.

    ``text_offset`` counts from the start of the completion (as vLLM does), so a
    streamed chunk's offsets start where the previous chunk's text ended.
    """
    offsets, position = [], start
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
        "text_offset": offsets,
    }


class Choice:
    """One choice's text, logprobs, tool calls and final event."""

    def __init__(self, index: int, tools: list[dict]):
        self.index = index
        self.tools = tools
        self.splitter = CallSplitter(tools) if tools else None
        self.parts: list[str] = []
        self.logprobs: list[dict] | None = None
        self.calls: list[dict] = []
        self.final: dict = {}
        self.streamed_chars = 0  # text streamed so far: where the next chunk's legacy text_offset starts

    def add(self, event: dict) -> None:
        self.parts.append(event["text"])
        if event.get("logprobs") is not None:
            self.logprobs = (self.logprobs or []) + event["logprobs"]

    def stream(self, event: dict) -> tuple[str, list[dict]]:
        """A streamed text event: (content to show now, calls closed by it)."""
        if self.splitter is None:
            return event["text"], []
        content, calls = self.splitter.feed(event["text"])
        self.calls += calls
        return content, calls

    def stream_end(self) -> tuple[str, list[dict]]:
        if self.splitter is None:
            return "", []
        content, calls = self.splitter.finish()
        self.calls += calls
        return content, calls

    def finish_reason(self) -> str | None:
        reason = self.final.get("finish_reason")
        return "tool_calls" if self.calls and reason == "stop" else reason


class Shaper:
    """Builds chat or text-completion objects, whole or as stream chunks."""

    def __init__(self, kind: str, model: str):
        self.kind = kind
        self.model = model
        self.created = int(time.time())
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _logprobs(self, entries: list[dict] | None, offset: int = 0) -> dict | None:
        if entries is None:
            return None
        return {"content": entries} if self.kind == "chat" else legacy_logprobs(entries, offset)

    def chunk(
        self,
        index: int = 0,
        text: str | None = None,
        finish_reason: str | None = None,
        role: bool = False,
        tool_calls: list[dict] | None = None,
        logprobs: list[dict] | None = None,
        offset: int = 0,
    ) -> dict:
        if self.kind == "chat":
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": self._logprobs(logprobs),
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": self._logprobs(logprobs, offset),
                "finish_reason": finish_reason,
            }
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, finals: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_of(finals),
        }

    def whole(self, choices: list[Choice]) -> dict:
        shaped = []
        for choice in choices:
            text = "".join(choice.parts)
            if self.kind == "chat":
                content, calls = parse_calls(text, choice.tools) if choice.tools else (text, [])
                choice.calls = calls
                message: dict = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                item = {"index": choice.index, "message": message}
            else:
                item = {"index": choice.index, "text": text}
            item.update(logprobs=self._logprobs(choice.logprobs), finish_reason=choice.finish_reason())
            shaped.append(item)
        return {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": shaped,
            "usage": usage_of([c.final for c in choices]),
        }


async def merged(sources: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """``(index, event)`` from several event streams at once, as they come (n choices in parallel).

    Each source runs in a task of its own; leaving early cancels them all, which closes
    the sources (their queue slots are given back, their worker requests cancelled).
    """
    if len(sources) == 1:
        async with aclosing(sources[0]) as only:
            async for event in only:
                yield 0, event
        return
    items: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[dict]) -> None:
        try:
            async with aclosing(source) as events:
                async for event in events:
                    await items.put((index, event, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the reader
            await items.put((index, None, exc))
            return
        await items.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(sources)]
    running = len(tasks)
    try:
        while running:
            index, event, error = await items.get()
            if error is not None:
                raise error
            if event is None:
                running -= 1
                continue
            yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
