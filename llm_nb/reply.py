"""``ChatReply``: one reply as it streams, and what it leaves in the conversation.

Besides text, a reply can carry tool calls (``tool_calls``, to run with
``run_tools()``, whose results go into the conversation for the next turn) and
JSON asked for with a schema (``parse()`` gives the validated value).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Session
    from .client import ChatStream
    from .structured import ToolCall

__all__ = ["ChatReply"]


class ChatReply:
    """A reply as it streams: iterate for text chunks.

    However it ends (finished, interrupted, or closed early) the user's message
    and the reply so far go into the conversation; ``interrupted`` says which.
    """

    def __init__(
        self,
        session: Session,
        model: str,
        stream: ChatStream,
        user_message: dict | None,
        keep: bool,
        *,
        schema: Any = None,
        functions: dict[str, Callable] | None = None,
    ):
        self.session = session
        self.model = model
        self._stream = stream
        self._user_message = user_message  # None: a turn that answers tool results
        self._keep = keep
        self.schema = schema  # what parse() validates against (None: any JSON)
        self.functions = functions or {}
        self._tool_calls: list[ToolCall] | None = None
        #: The ``role: tool`` messages added with run_tools() / add_tool_result().
        self.tool_messages: list[dict] = []
        self._recorded = False
        self._iterator: Iterator[str] | None = None
        self.finished = False
        self.interrupted = False
        self.error: BaseException | None = None

    # --- reading ---------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def _run(self) -> Iterator[str]:
        try:
            yield from self._stream
            self.finished = True
        except (KeyboardInterrupt, GeneratorExit):
            self.interrupted = True
            raise
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._stream.close()  # the host cancels at its next token
            self._record()

    def close(self) -> None:
        """Stop the generation on the host; what came so far stays in the conversation."""
        if self._iterator is not None:
            self._iterator.close()
        if not self.finished:
            self.interrupted = True
        self._stream.close()
        self._record()

    def read(self) -> str:
        for _ in self:
            pass
        return self.text

    def _record(self) -> None:
        if self._recorded or not self._keep:
            return
        self._recorded = True
        if self.error is not None and not self.text:
            return  # nothing was said: a failed request leaves the conversation as it was
        said = {"role": "assistant", "content": self.text}
        if self._stream.tool_calls:  # a copy: the conversation must not change with the stream's own list
            said = {
                "role": "assistant",
                "content": self.text or None,
                "tool_calls": copy.deepcopy(self._stream.tool_calls),
            }
        self.session._append(self.model, *[m for m in (self._user_message, said) if m is not None])

    # --- what came back ----------------------------------------------------------
    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls the model asked for (read the reply first); ``call.run()`` runs one."""
        if self._tool_calls is None:
            if not self._stream.tool_calls:
                return []  # not cached: the reply may still be streaming
            from .structured import ToolCall

            self._tool_calls = [ToolCall.from_openai(c, self.functions) for c in self._stream.tool_calls]
        return self._tool_calls

    def run_tools(self) -> list[Any]:
        """Run every call and add its result to the conversation; ``chat()`` with no prompt then answers from them."""
        self.read()
        results = []
        for call in self.tool_calls:
            results.append(call.run())
            self.add_tool_result(call, results[-1])
        return results

    def add_tool_result(self, call: ToolCall, result: Any) -> dict:
        """Give the model ``result`` for ``call`` on the next turn (a call you ran yourself)."""
        message = call.message(result)
        self.tool_messages.append(message)
        if self._keep:
            self.session._append(self.model, message)
        return message

    def parse(self) -> Any:
        """The reply's JSON validated against the schema asked for; ``StructuredOutputError`` (with ``.raw``) if not."""
        from .structured import validate_as

        return validate_as(self.schema, self.read(), finish_reason=self.finish_reason)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in self._stream.tool_calls]
        return f"ChatReply({self.text!r}" + (f", tool_calls=[{', '.join(calls)}])" if calls else ")")

    @property
    def usage(self) -> dict | None:
        return self._stream.usage

    @property
    def first_token_s(self) -> float | None:
        return self._stream.first_token_s

    @property
    def elapsed_s(self) -> float:
        return (
            self._stream.elapsed_s if self._stream.elapsed_s is not None else time.perf_counter() - self._stream.started
        )

    @property
    def tokens(self) -> int:
        """Generated tokens: the host's count, or the chunks seen when the reply was cut short."""
        if self.usage and self.usage.get("completion_tokens") is not None:
            return int(self.usage["completion_tokens"])
        return len(self._stream.parts)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first."""
        if self.first_token_s is None or self.tokens < 2:
            return None
        decode = self.elapsed_s - self.first_token_s
        return (self.tokens - 1) / decode if decode > 0 else None

    def footer(self) -> str:
        parts = [f"{self.tokens} token{'s' * (self.tokens != 1)}"]
        if self.first_token_s is not None:
            parts.append(f"first token {self.first_token_s:.2f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        parts.append(self.model)
        if self.interrupted:
            parts.append("interrupted: stopped on the host, partial reply kept")
        return " · ".join(parts)
