"""Structured output and tools on the kernel side: schemas from Python types, replies back into them.

    json_schema_of(Person)        # a pydantic model, dataclass, TypedDict or JSON-schema dict -> JSON schema
    validate_as(Person, text)     # the reply's text -> a Person, or StructuredOutputError with .raw
    tool_of(get_weather)          # a function -> an OpenAI tool definition (signature + docstring)
    ToolCall(...).run()           # a call the model asked for, run with validated arguments

The host constrains decoding to the schema, so a local model's reply always parses;
validation here still runs, because a ``json_object`` reply, a reply cut at
``max_tokens`` or a remote engine's reply can miss. Imports pydantic, never the host.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import typing_extensions
from pydantic import Field, TypeAdapter, ValidationError

from .errors import InvalidRequest, StructuredOutputError

__all__ = [
    "StructuredOutputError",
    "ToolCall",
    "json_schema_of",
    "response_format_of",
    "tool_of",
    "validate_as",
]

#: What ``llm_nb.extract`` asks for when the caller gives no instructions of its own.
EXTRACT_INSTRUCTIONS = (
    "Extract the information from the text as JSON. Use only what the text says; "
    "where it does not say, give null or leave the field out if the schema allows."
)


# --- schemas ------------------------------------------------------------------------------------
def json_schema_of(schema: Any) -> dict:
    """The JSON schema of a pydantic model class, a dataclass, a TypedDict, any type pydantic knows, or a dict.

    A dict is taken as a JSON schema as it is. Derived schemas close every object that
    lists its properties (``additionalProperties: false``), as strict mode expects;
    pydantic's ``required`` is kept, so a field with a default stays optional.
    """
    if isinstance(schema, Mapping):
        return copy.deepcopy(dict(schema))
    return _closed(_adapter(schema).json_schema())


def schema_name(schema: Any) -> str:
    """A name for ``response_format.json_schema.name``: the class's name or the schema's title."""
    name = schema.get("title") if isinstance(schema, Mapping) else getattr(schema, "__name__", None)
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(name or "response"))[:64]


def response_format_of(schema: Any) -> dict:
    """``response_format`` for ``schema``; ``"json"`` (or ``dict``) asks for any JSON object."""
    if schema == "json" or schema is dict:
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {"name": schema_name(schema), "schema": json_schema_of(schema), "strict": True},
    }


def _closed(schema: Any) -> Any:
    """Set ``additionalProperties: false`` on every object schema with properties that does not say otherwise."""
    if isinstance(schema, dict):
        if "properties" in schema and schema.get("type", "object") == "object":
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)
    return schema


def _adapter(schema: Any) -> TypeAdapter:
    try:
        return _cached_adapter(schema)
    except TypeError:  # an unhashable type (Annotated with a Field): build it each time
        return _make_adapter(schema)


@functools.lru_cache(maxsize=256)
def _cached_adapter(schema: Any) -> TypeAdapter:
    return _make_adapter(schema)


def _make_adapter(schema: Any) -> TypeAdapter:
    try:
        return TypeAdapter(_compatible(schema))
    except Exception as exc:  # pydantic's errors for a type it cannot model
        raise InvalidRequest(
            f"cannot derive a JSON schema from {schema!r}: {exc}. Use a pydantic model, a dataclass, "
            "a TypedDict (typing_extensions.TypedDict for nested ones on Python 3.11) or a JSON-schema dict"
        ) from None


def _compatible(schema: Any) -> Any:
    """A ``typing.TypedDict`` rebuilt as a ``typing_extensions`` one: pydantic takes only those before Python 3.12."""
    if not typing.is_typeddict(schema) or type(schema).__module__ != "typing":
        return schema
    hints = typing.get_type_hints(schema, include_extras=True)
    fields = {}
    for name, hint in hints.items():
        # The wrapper, where there is one, decides: under string annotations 3.11's __required_keys__ misses it.
        required = name in schema.__required_keys__
        if typing.get_origin(hint) in (typing.Required, typing.NotRequired):
            required, hint = typing.get_origin(hint) is typing.Required, typing.get_args(hint)[0]
        fields[name] = (typing_extensions.Required if required else typing_extensions.NotRequired)[hint]
    rebuilt = typing_extensions.TypedDict(schema.__name__, fields)
    rebuilt.__doc__ = schema.__doc__
    return rebuilt


# --- replies into values ------------------------------------------------------------------------
def parse_json(text: str, finish_reason: str | None = None) -> Any:
    """The reply's JSON, or ``StructuredOutputError`` carrying the text."""
    try:
        return json.loads(text)
    except ValueError as exc:
        hint = ""
        if finish_reason == "length":
            hint = "; the reply was cut at max_tokens: ask for more tokens"
        raise StructuredOutputError(
            f"the reply is not valid JSON ({exc}){hint}; the raw text is on the error's .raw: {_preview(text)}",
            raw=text,
        ) from None


def validate_as(schema: Any, data: Any, *, finish_reason: str | None = None) -> Any:
    """``data`` (a reply's text, or parsed JSON) as an instance of ``schema``.

    A pydantic model gives an instance, a dataclass a dataclass, a TypedDict or a
    JSON-schema dict a dict; ``schema=None`` (or ``"json"``) gives the parsed JSON.
    """
    raw = data if isinstance(data, str) else json.dumps(data, default=str)
    if isinstance(data, str):
        data = parse_json(data, finish_reason)
    if schema is None or schema == "json" or schema is dict:
        return data
    if isinstance(schema, Mapping):
        import jsonschema

        error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(data))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the top level"
            raise StructuredOutputError(
                f"the reply does not match the schema at {where}: {error.message}; raw text: {_preview(raw)}", raw=raw
            )
        return data
    try:
        return _adapter(schema).validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the top level'}: {e['msg']}" for e in exc.errors())
        name = getattr(schema, "__name__", str(schema))
        raise StructuredOutputError(
            f"the reply does not validate as {name}: {problems}; raw text: {_preview(raw)}", raw=raw
        ) from None


def _preview(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --- tools --------------------------------------------------------------------------------------
def tool_of(function: Callable | Mapping) -> dict:
    """An OpenAI tool definition for ``function``: its name, its docstring's first paragraph, its parameters.

    Type hints give the parameters' schemas (no hint: any JSON value), a default makes a
    parameter optional, and Google- or NumPy-style ``Args:`` lines give their descriptions.
    A dict is taken as a tool definition already made.
    """
    if isinstance(function, Mapping):
        return dict(function)
    name = _tool_name(function)
    description, _ = _docstring(function)
    parameters = _closed(_arguments(function).json_schema())
    parameters.pop("title", None)
    spec = {"name": name, "parameters": parameters}
    if description:
        spec["description"] = description
    return {"type": "function", "function": spec}


def tools_of(tools: Iterable[Callable | Mapping]) -> tuple[list[dict], dict[str, Callable]]:
    """Tool definitions for the request, and the Python functions by name to run the calls with."""
    definitions, functions = [], {}
    for tool in tools:
        definition = tool_of(tool)
        definitions.append(definition)
        if not isinstance(tool, Mapping):
            functions[definition["function"]["name"]] = tool
    return definitions, functions


def tool_choice_of(choice: Any) -> Any:
    """``"auto"``, ``"none"``, ``"required"``, a function or its name (that one tool), or an OpenAI dict."""
    if choice is None or isinstance(choice, Mapping) or choice in ("auto", "none", "required"):
        return choice
    name = choice if isinstance(choice, str) else _tool_name(choice)
    return {"type": "function", "function": {"name": name}}


def _tool_name(function: Callable) -> str:
    name = getattr(function, "__name__", "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise InvalidRequest(f"a tool needs a name of letters, digits, _ or - (at most 64): {function!r} has {name!r}")
    return name


@functools.lru_cache(maxsize=256)
def _arguments(function: Callable) -> TypeAdapter:
    """The function's parameters as a TypedDict (no name clashes with BaseModel's attributes, as create_model has)."""
    _, described = _docstring(function)
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = getattr(function, "__annotations__", {})
    fields: dict[str, Any] = {}
    for p in inspect.signature(function).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("self", "cls"):
            continue
        info = {"description": described[p.name]} if p.name in described else {}
        if p.default is not p.empty and _jsonable(p.default):
            info["default"] = p.default
        hint = hints.get(p.name, Any)
        hint = Annotated[hint, Field(**info)] if info else hint
        fields[p.name] = hint if p.default is p.empty else typing_extensions.NotRequired[hint]
    return _adapter(typing_extensions.TypedDict(f"{_tool_name(function)}_arguments", fields))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments)\s*:?\s*$")
_NUMPY_RULE = re.compile(r"^\s*-{3,}\s*$")
_OTHER_SECTION = re.compile(r"^\s*(Returns?|Yields?|Raises?|Examples?|Notes?|See Also|Attributes)\s*:?\s*$")
_GOOGLE_ITEM = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_ITEM = re.compile(r"^(\w+)\s*(:.*)?$")


def _docstring(function: Callable) -> tuple[str, dict[str, str]]:
    """The first paragraph, and each parameter's description from an ``Args:``/``Parameters`` section."""
    doc = inspect.getdoc(function) or ""
    lines = doc.splitlines()
    first = []
    for line in lines:
        if not line.strip() or _SECTION.match(line):
            break
        first.append(line.strip())
    described: dict[str, str] = {}
    in_section, indent, current = False, None, None
    for i, line in enumerate(lines):
        if _SECTION.match(line):
            in_section, indent, current = True, None, None
            continue
        if not in_section or _NUMPY_RULE.match(line):
            continue
        if _OTHER_SECTION.match(line) or (i + 1 < len(lines) and _NUMPY_RULE.match(lines[i + 1])):
            in_section = False
            continue
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        text = line.strip()
        if depth == indent:  # a parameter's own line: "name (type): text" or NumPy's "name : type"
            google, numpy = _GOOGLE_ITEM.match(text), _NUMPY_ITEM.match(text)
            if google and (google.group(2) or google.group(3)) and not text.startswith(f"{google.group(1)} :"):
                current = google.group(1).lstrip("*")
                described[current] = google.group(3).strip()
            elif numpy:
                current = numpy.group(1)
                described[current] = ""
            else:
                current = None
        elif current is not None:  # a continuation line
            described[current] = f"{described[current]} {text}".strip()
    return " ".join(first), {k: v for k, v in described.items() if v}


@dataclass
class ToolCall:
    """A call the model asked for: ``run()`` calls the function with the arguments validated against its hints."""

    id: str
    name: str
    arguments: dict
    function: Callable | None = field(default=None, repr=False)

    @classmethod
    def from_openai(cls, call: Mapping, functions: Mapping[str, Callable]) -> ToolCall:
        """From a reply's ``tool_calls`` entry (``arguments`` a JSON string, as OpenAI sends it)."""
        spec = call.get("function") or {}
        raw = spec.get("arguments")
        arguments = raw if isinstance(raw, Mapping) else parse_json(raw or "{}")
        if not isinstance(arguments, dict):
            raise StructuredOutputError(f"tool call arguments must be a JSON object, not {_preview(raw)}", raw=raw)
        name = str(spec.get("name") or "")
        return cls(str(call.get("id") or ""), name, arguments, functions.get(name))

    def run(self) -> Any:
        """Call the function; arguments that do not fit its type hints raise ``StructuredOutputError``."""
        if self.function is None:
            raise InvalidRequest(f"the model called {self.name!r}, which is not one of the Python functions given")
        try:
            values = _arguments(self.function).validate_python(self.arguments)
        except ValidationError as exc:
            raise StructuredOutputError(
                f"the model's arguments for {self.name} do not fit its signature: {exc.errors()[0]['msg']}",
                raw=json.dumps(self.arguments),
            ) from None
        positional = [
            values.pop(p.name)
            for p in inspect.signature(self.function).parameters.values()
            if p.kind is p.POSITIONAL_ONLY and p.name in values
        ]
        return self.function(*positional, **values)

    def message(self, result: Any) -> dict:
        """The ``role: tool`` message that gives the model ``result`` on the next turn."""
        return {"role": "tool", "tool_call_id": self.id, "name": self.name, "content": as_text(result)}

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


def as_text(value: Any) -> str:
    """A tool's result as the text the model reads: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, default=str)


def request_fields(
    schema: Any = None, tools: Iterable | None = None, tool_choice: Any = None, response_format: Any = None
) -> tuple[dict, Any, dict[str, Callable]]:
    """A chat's ``response_format``, ``tools`` and ``tool_choice``; the schema its reply parses with; the functions."""
    if schema is not None:
        if response_format is not None:
            raise InvalidRequest("pass schema= or response_format=, not both")
        response_format = response_format_of(schema)
    elif isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
    fields: dict[str, Any] = {"response_format": response_format, "tool_choice": tool_choice_of(tool_choice)}
    functions: dict[str, Callable] = {}
    if tools:
        fields["tools"], functions = tools_of(tools)
    return {k: v for k, v in fields.items() if v is not None}, schema, functions
