"""How the magics show things in a notebook or a terminal: a streaming reply, a load's progress, errors.

A reply is one display updated at a steady rate (not once per token), with a
footer; a load shows progress only once it takes a while, then gives way to one
line. On a terminal (plain IPython) the same text is written as it comes.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TYPE_CHECKING

from IPython.display import display

if TYPE_CHECKING:
    from .api import ChatReply


def one_line(exc: BaseException) -> str:
    """An error as one line: its lines joined, so a traceback-free message still carries every hint."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " | ".join(lines) or type(exc).__name__


def _escape_md(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


def text_bundle(line: str) -> dict:
    return {"text/plain": line, "text/markdown": _escape_md(line)}


def reply_bundle(text: str, footer: str, fmt: str, streaming: bool = False) -> dict:
    """A reply as a display bundle: text/plain always, text/markdown unless ``fmt`` is text."""
    cursor = " ▌" if streaming else ""
    plain = f"{text}{cursor}\n\n[{footer}]" if footer else text + cursor
    if fmt == "text":
        return {"text/plain": plain}
    if fmt in ("code", "json") and not text.lstrip().startswith("```"):
        body = f"```{'json' if fmt == 'json' else ''}\n{text}\n```"
    else:
        body = text + cursor
        if streaming and len(re.findall(r"^\s*```", text, flags=re.M)) % 2:
            body += "\n```"  # close a fence that is still open, so the footer renders outside it
    return {"text/plain": plain, "text/markdown": f"{body}\n\n*{footer}*" if footer else body}


class Interrupted(KeyboardInterrupt):
    """The kernel was interrupted in a magic: shown as one line, and the cell still counts as interrupted."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class ChatInterrupted(Interrupted):
    """Interrupted during a reply."""


class LiveReply:
    """One display for a reply, updated at a steady rate (not per token); plain text on a terminal."""

    def __init__(self, rich: bool, fmt: str, interval: float, model: str):
        self.rich, self.fmt, self.interval, self.model = rich, fmt, interval, model
        self.text = ""
        self.chunks = 0
        self.handle = None
        self.updates = 0
        self._last = 0.0

    def start(self) -> None:
        if self.rich:
            self.handle = display(
                reply_bundle("", f"waiting for {self.model}…", self.fmt, streaming=True), raw=True, display_id=True
            )
        self._last = time.monotonic()

    def feed(self, piece: str) -> None:
        self.text += piece
        self.chunks += 1
        if not self.rich:
            sys.stdout.write(piece)
            sys.stdout.flush()
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.updates += 1
            footer = f"{self.chunks} tokens so far · {self.model}"
            self.handle.update(reply_bundle(self.text, footer, self.fmt, streaming=True), raw=True)

    def finish(self, reply: ChatReply | None, note: str = "", text: str | None = None) -> None:
        """The final display; ``text`` replaces the reply's own (pretty-printed JSON)."""
        if text is None:
            text = reply.text if reply is not None else self.text
        footer = reply.footer() if reply is not None else ""
        if note:
            footer = f"{footer} · {note}" if footer else note
        if self.rich:
            self.updates += 1
            self.handle.update(reply_bundle(text, footer, self.fmt), raw=True)
        else:
            sys.stdout.write(f"\n[{footer}]\n" if footer else "\n")
            sys.stdout.flush()


class LoadProgress:
    """Shows a load's progress once it has taken ``after_s``; then gives way to one final line."""

    def __init__(self, rich: bool, model: str, after_s: float = 1.0, interval: float = 0.25):
        self.rich, self.model, self.after_s, self.interval = rich, model, after_s, interval
        self.started = time.monotonic()
        self.handle = None
        self.shown = False
        self._last = 0.0

    def __call__(self, event: dict) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed < self.after_s or elapsed - self._last < self.interval:
            return
        self._last = elapsed
        parts = [f"loading {self.model}"]
        if event.get("message"):
            parts.append(str(event["message"]))
        if isinstance(event.get("fraction"), (int, float)):
            parts.append(f"{100 * event['fraction']:.0f} %")
        parts.append(f"{elapsed:.0f} s")
        line = " · ".join(parts) + " …"
        if self.rich:
            if self.handle is None:
                self.handle = display(text_bundle(line), raw=True, display_id=True)
            else:
                self.handle.update(text_bundle(line), raw=True)
        elif sys.stderr.isatty():  # a carriage-return status line only where a terminal redraws it
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        else:
            return
        self.shown = True

    def done(self, line: str | None) -> None:
        """Replace the progress with ``line`` (or show ``line`` alone when no progress was needed)."""
        if self.rich:
            if self.handle is not None:
                self.handle.update(text_bundle(line or ""), raw=True)
            elif line:
                display(text_bundle(line), raw=True)
        else:
            if self.shown:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            if line:
                print(line)
