"""Structured output on the host: the grammar a request's reply must match, and its tool calls read back.

``response_format`` and ``tools``/``tool_choice`` become one llguidance grammar,
built and validated here, so a schema the engine cannot compile is a 400 naming
the part at fault before anything is queued; the worker compiles it against its
vocabulary and masks every token. Tool calls use the one syntax of
``llm_nb.tool_format``; ``parse_calls`` and ``CallSplitter`` read them out of the
text, whole or as it streams.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from typing import Any

from ..errors import InvalidRequest
from ..tool_format import CALL_CLOSE, CALL_OPEN

#: Compact JSON: one space after , and :, no free whitespace (a small model given
#: free whitespace may spend its tokens on newlines).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: The most calls one reply may make when parallel calls are allowed (bounds a looping model).
MAX_CALLS = 8


def _llguidance():
    from llguidance import LLMatcher, StructTag

    return LLMatcher, StructTag


@functools.lru_cache(maxsize=256)
def _checked_schema(schema_json: str, where: str) -> str:
    """The grammar for one JSON schema (given as JSON text, the cache key), or invalid_schema."""
    matcher, _ = _llguidance()
    try:
        grammar = matcher.grammar_from_json_schema(schema_json, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}", code="invalid_schema", param=where) from None
    error = matcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(
            f"{where}: the schema cannot be used for constrained decoding: {error.strip()}",
            code="invalid_schema",
            param=where,
        )
    return grammar


@functools.lru_cache(maxsize=256)
def _checked_lark(lark: str, where: str) -> str:
    matcher, _ = _llguidance()
    return _checked_grammar(matcher.grammar_from_lark(lark), where)


@functools.lru_cache(maxsize=256)
def _checked_grammar(grammar: str, where: str) -> str:
    matcher, _ = _llguidance()
    error = matcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(f"{where}: {error.strip()}", code="invalid_schema", param=where)
    return grammar


def closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists its properties and says nothing.

    OpenAI's strict mode demands it; for tool arguments it keeps a small model from
    inventing keys that no function takes. An explicit ``additionalProperties`` is kept.
    """
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    for key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties"):
        if key in out and isinstance(out[key], (dict, list)):
            out[key] = closed(out[key])
    for key in ("$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    return out


def _schema_text(schema: Any, where: str) -> str:
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where} must be a JSON schema object", code="invalid_schema", param=where)
    return json.dumps(schema, sort_keys=True)


def response_schema(response_format: dict | None) -> tuple[dict | None, str]:
    """The JSON schema a reply must match (None: free text) and where it was given."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None, ""
    kind = response_format["type"]
    if kind == "json_object":
        return {"type": "object"}, "response_format"
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema")
    if schema is None:
        schema = {}  # OpenAI allows it: any JSON value
    return (closed(schema) if spec.get("strict") else schema), "response_format.json_schema.schema"


def _call_schema(tool: dict) -> dict:
    function = tool["function"]
    parameters = closed(function.get("parameters") or {"type": "object", "properties": {}})
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": JSON_OPTIONS,
    }


def check_tools(tools: list[dict]) -> None:
    """Every tool's parameters compile, checked one by one so the error names the tool."""
    seen = set()
    for index, tool in enumerate(tools):
        function = tool["function"]
        if function["name"] in seen:
            raise InvalidRequest(f"tools[{index}]: a second tool named {function['name']!r}", param="tools")
        seen.add(function["name"])
        where = f"tools[{index}].function.parameters"
        parameters = function.get("parameters")
        if parameters is None:
            continue
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidRequest(f"{where} must be a JSON schema of type object", code="invalid_schema", param=where)
        _checked_schema(_schema_text(parameters, where), where)


def chosen_tools(tools: list[dict] | None, tool_choice: Any) -> tuple[list[dict], str]:
    """(the tools the model may call, "none" | "auto" | "required") after ``tool_choice``."""
    tools = tools or []
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        picked = [tool for tool in tools if tool["function"]["name"] == name]
        if not picked:
            known = ", ".join(t["function"]["name"] for t in tools) or "none given"
            raise InvalidRequest(
                f"tool_choice names the function {name!r}, which is not in tools ({known})",
                code="invalid_tool_choice",
                param="tool_choice",
            )
        return picked, "required"
    if tool_choice == "required" and not tools:
        raise InvalidRequest(
            'tool_choice "required" needs at least one tool in tools', code="invalid_tool_choice", param="tool_choice"
        )
    if tool_choice == "none" or not tools:
        return [], "none"
    return tools, tool_choice


def grammar_for(
    response_format: dict | None, tools: list[dict], mode: str, parallel_tool_calls: bool = False
) -> str | None:
    """The llguidance grammar for a request, or None when the reply is free text."""
    schema, where = response_schema(response_format)
    if mode == "none" or not tools:
        return None if schema is None else _checked_schema(_schema_text(schema, where), where)
    check_tools(tools)
    body = " | ".join(f"call_{i}" for i in range(len(tools)))
    rules = "\n".join(
        f"call_{i}: {json.dumps(CALL_OPEN + chr(10))} %json {json.dumps(_call_schema(tool))} "
        f"{json.dumps(chr(10) + CALL_CLOSE + chr(10))}"
        for i, tool in enumerate(tools)
    )
    repeat = f"call{{0,{MAX_CALLS - 1}}}" if parallel_tool_calls else ""
    calls = f"calls: call {repeat}\ncall: {body}\n{rules}\n"
    if mode == "required":
        return _checked_lark(f"start: calls\n{calls}", "tools")
    if schema is not None:  # auto with a schema: either the JSON answer or calls
        text = json.dumps(dict(schema, **{"x-guidance": JSON_OPTIONS}))
        _checked_schema(_schema_text(schema, where), where)
        return _checked_lark(f"start: answer | calls\nanswer: %json {text}\n{calls}", "tools")
    # auto: free text, and wherever the model opens a call, the call is held to its schema.
    _, struct_tag = _llguidance()
    tags = [
        struct_tag(
            trigger=CALL_OPEN,
            begin=f'{CALL_OPEN}\n{{"name": {json.dumps(tool["function"]["name"])}, "arguments": ',
            grammar=dict(
                closed(tool["function"].get("parameters") or {"type": "object"}), **{"x-guidance": JSON_OPTIONS}
            ),
            end=f"}}\n{CALL_CLOSE}\n",
        )
        for tool in tools
    ]
    return _checked_grammar(struct_tag.to_grammar(tags, assume_special=False), "tools")


# --- reading calls back -------------------------------------------------------------------------
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")  # a call with NaN in it is text, not a call


def _as_call(body: str, names: set[str]) -> dict | None:
    """``{"name", "arguments"}`` JSON as an OpenAI tool call, or None if it is not one."""
    try:
        data = json.loads(body, parse_constant=_not_json)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        try:
            arguments = json.loads(arguments, parse_constant=_not_json)
        except ValueError:
            return None
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.S)


def parse_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, tool calls) from a whole reply. Text that is not a well-formed call stays content."""
    names = {tool["function"]["name"] for tool in tools}
    if not names:
        return text, []
    calls, content, position = [], [], 0
    for match in _BLOCK.finditer(text):
        call = _as_call(match.group(1).strip(), names)
        if call is None:
            continue
        content.append(text[position : match.start()])
        calls.append(call)
        position = match.end()
    content.append(text[position:])
    if not calls:  # other template families write the call as the whole reply, e.g. Llama 3.1
        whole = _as_call(text.strip(), names) if text.strip().startswith("{") else None
        return (None, [whole]) if whole else (text, [])
    rest = "".join(content).strip()
    return (rest or None), calls


class CallSplitter:
    """Streamed text in; content safe to show now, and each call as soon as it closes, out."""

    def __init__(self, tools: list[dict]):
        self.names = {tool["function"]["name"] for tool in tools}
        self.buffer = ""
        self.in_call = False
        self.calls = 0
        self.held_space = ""  # whitespace between calls is not content

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        shown, calls = [], []
        while True:
            if self.in_call:
                end = self.buffer.find(CALL_CLOSE)
                if end < 0:
                    break
                body, self.buffer = self.buffer[:end], self.buffer[end + len(CALL_CLOSE) :]
                self.in_call = False
                call = _as_call(body.strip(), self.names)
                if call is None:  # not a call after all: it was text
                    shown.append(CALL_OPEN + body + CALL_CLOSE)
                else:
                    calls.append(call)
                    self.calls += 1
                continue
            start = self.buffer.find(CALL_OPEN)
            if start >= 0:
                shown.append(self.buffer[:start])
                self.buffer, self.in_call = self.buffer[start + len(CALL_OPEN) :], True
                continue
            hold = _partial_suffix(self.buffer, CALL_OPEN)
            shown.append(self.buffer[: len(self.buffer) - hold])
            self.buffer = self.buffer[len(self.buffer) - hold :]
            break
        return self._content("".join(shown)), calls

    def finish(self) -> tuple[str, list[dict]]:
        """What is left at the end: an unclosed call (cut by max_tokens) is tried, else shown as text."""
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            self.in_call = False
            call = _as_call(rest.strip(), self.names)
            if call is not None:
                self.calls += 1
                return "", [call]
            rest = CALL_OPEN + rest
        return self._content(rest, final=True), []

    def _content(self, text: str, final: bool = False) -> str:
        """Text to show, less trailing whitespace, held until text follows it (before a call it is dropped)."""
        text = self.held_space + text
        body = text.rstrip()
        self.held_space = text[len(body) :]
        if final and not self.calls:
            return body + self._release()
        return body

    def _release(self) -> str:
        out, self.held_space = self.held_space, ""
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could begin ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
