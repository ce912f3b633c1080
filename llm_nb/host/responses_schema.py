"""``POST /v1/responses`` (OpenAI's Responses API): its request, validated strictly, and its chat translation.

The host answers a Responses request with the chat machinery: ``ResponsesRequest.chat_request()``
turns it into a ``ChatCompletionRequest``, so the prompt template, tools, grammar, budget, queue and
cancellation are the chat route's own. A field that asks for what the host does not do (built-in
tools, background runs, stored responses, reasoning settings) is a 400 that names it, never dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic_core import PydanticCustomError

from .schemas import MAX_TOKENS_LIMIT, ChatCompletionRequest, ToolName, parse

#: The item types of ``input`` the host serves: enough for a conversation and a tool-calling loop.
INPUT_ITEM_TYPES = ("message", "function_call", "function_call_output")
#: Content part types the host's (text) models read; output_text is what an earlier response gave back.
TEXT_PART_TYPES = ("input_text", "output_text")

#: Fields that ask for something this host does not do, and why. Given with anything but their
#: "off" value (null, false, 0, empty, "disabled", an object of nulls), they are a 400.
NOT_SERVED = {
    "previous_response_id": (
        "this host stores no responses, so it cannot continue one by id; send the whole conversation in "
        "input instead (the earlier input items, then the previous response's output items, then the new ones)"
    ),
    "conversation": "this host keeps no conversations; send the whole conversation in input",
    "prompt": "this host has no stored prompt templates; send instructions and input",
    "background": "this host answers while the connection is open, never in the background (stream: true shows progress)",
    "reasoning": "the host's models have no reasoning settings; leave reasoning out or null",
    "include": "this host has no extra output data to include on /v1/responses (for token logprobs, use /v1/chat/completions)",
    "top_logprobs": "logprobs are not served on /v1/responses; use /v1/chat/completions with logprobs",
    "max_tool_calls": (
        "not served; a forced reply (tool_choice required or named) makes one call, or up to 8 with "
        "parallel_tool_calls: true"
    ),
    "truncation": (
        'only "disabled": a prompt longer than the model\'s context is a context_length_exceeded error, '
        "never cut silently"
    ),
    "verbosity": "the host's models have no verbosity setting; leave it out",
    "context_management": "not served by this host",
    "moderation": "not served by this host",
    "image": "not served by this host (text models only)",
    "access_programs": "not served by this host",
    "background_options": "not served by this host",
    "prompt_cache_options": "not served by this host (llama.cpp reuses a shared prompt prefix by itself)",
}


def _is_off(value: Any) -> bool:
    if isinstance(value, dict):
        return all(v is None for v in value.values())
    if isinstance(value, bool):
        return not value
    return value in (None, 0, "disabled", [])


def _not_served(field: str) -> PydanticCustomError:
    return PydanticCustomError("not_served", "{why}", {"why": NOT_SERVED[field]})


class _Strict(BaseModel):
    # Unlike chat's (which ignores what it does not use), a Responses request with an unknown field
    # is a 400 naming it, as OpenAI answers: most fields there ask for a feature, and a dropped one
    # would change the answer without a word.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Echoed(BaseModel):
    # Input items are often an earlier response's output items sent back: keep what we read, ignore
    # the rest (ids, statuses, annotations).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextContent(_Echoed):
    type: Literal["input_text", "output_text"]
    text: str


def _text_parts_only(value: Any) -> Any:
    if isinstance(value, list):
        for index, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in TEXT_PART_TYPES:
                raise PydanticCustomError(
                    "not_served",
                    "part {index} is '{kind}': the host's models read text only (input_text, output_text)",
                    {"index": index, "kind": kind},
                )
    return value


def _chat_content(content: str | list[TextContent]) -> str | list[dict]:
    """Content as chat takes it: a string, or its text parts (chat joins them as it joins its own)."""
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": part.text} for part in content]


class MessageItem(_Echoed):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextContent]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value):
        return _text_parts_only(value)


class FunctionCallItem(_Echoed):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: ToolName
    arguments: str = Field(max_length=1_000_000, description="the arguments, as a JSON string")


class FunctionCallOutputItem(_Echoed):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[TextContent] = Field(description="what the function returned")

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, value):
        return _text_parts_only(value)

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "message")  # a message may leave its type out
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(_Strict):
    """A function tool in the Responses form: flat, no ``function`` wrapper."""

    type: Literal["function"]
    name: ToolName
    description: str | None = Field(None, max_length=100_000)
    parameters: dict | None = None
    strict: bool | None = None

    def chat_tool(self) -> dict:
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: ToolName


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64, description="json_schema: the schema's name")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="json_schema: the JSON schema the reply matches")
    strict: bool | None = None

    def chat_format(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        if self.schema_ is None:
            raise PydanticCustomError("missing_schema", 'a "json_schema" format needs "schema"')
        spec = {"name": self.name or "response", "schema": self.schema_, "strict": self.strict}
        if self.description is not None:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}


class TextConfig(_Strict):
    format: TextFormat | None = Field(None, description="text, json_object or json_schema (constrained decoding)")
    verbosity: str | None = None

    @field_validator("verbosity")
    @classmethod
    def _no_verbosity(cls, value):
        if value is not None:
            raise _not_served("verbosity")
        return value

    @field_validator("format")
    @classmethod
    def _schema_given(cls, value):
        if value is not None:
            value.chat_format()  # a json_schema without its schema is a 400 here, naming text.format
        return value


class ResponsesStreamOptions(_Strict):
    include_obfuscation: bool | None = None  # nothing to obfuscate on loopback: accepted, ignored


def _string_input_too(schema: dict) -> None:
    """The document says what clients may send: ``input`` as a string too (validation turns it into a message)."""
    listed = schema["properties"]["input"]
    described = {k: listed.pop(k) for k in ("title", "description") if k in listed}
    schema["properties"]["input"] = {"anyOf": [{"type": "string"}, listed], **described}


class ResponsesRequest(_Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=_string_input_too)

    model: str = Field(min_length=1, max_length=256)
    # Typed as the list it becomes: a str | list union would report every fault twice, once per member.
    input: list[InputItem] = Field(
        description="a user message, or a list of message, function_call and function_call_output items"
    )
    instructions: str | None = Field(None, description="a system message put before input")
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128, description="function tools only")
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = Field(
        None, description="allow up to 8 calls in one forced reply; off unless true, as on /v1/chat/completions"
    )
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="up to 16 strings, repeated in the response"
    )
    user: str | None = Field(None, max_length=512)
    store: bool | None = Field(None, description="accepted; this host stores no responses either way")
    # Hints that change nothing here: accepted and ignored.
    service_tier: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    prompt_cache_retention: str | None = Field(None, max_length=64)
    safety_identifier: str | None = Field(None, max_length=512)
    # Not served (NOT_SERVED says why): declared so that their "off" values pass and others are named.
    previous_response_id: str | None = None
    conversation: str | dict | None = None
    prompt: dict | None = None
    background: bool | None = None
    reasoning: dict | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    verbosity: str | None = None
    context_management: list | None = None
    moderation: dict | None = None
    image: dict | None = None
    access_programs: dict | None = None
    background_options: dict | None = None
    prompt_cache_options: dict | None = None

    @field_validator(*NOT_SERVED)
    @classmethod
    def _refuse_what_is_not_served(cls, value, info):
        if not _is_off(value):
            raise _not_served(info.field_name)
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _served_item_types(cls, value):
        if isinstance(value, str):
            return [{"type": "message", "role": "user", "content": value}]
        if not isinstance(value, list):
            raise PydanticCustomError("input_type", "input must be a string or a list of items")
        if not value:
            raise PydanticCustomError("empty_input", "input needs at least one item")
        for index, item in enumerate(value):
            kind = _item_type(item)
            if kind == "message" and isinstance(item, dict) and item.get("role") == "tool":
                raise PydanticCustomError(
                    "tool_role",
                    'input[{index}] has role "tool": on /v1/responses a function\'s result is a '
                    '{"type": "function_call_output", "call_id", "output"} item',
                    {"index": index},
                )
            if isinstance(kind, str) and kind not in INPUT_ITEM_TYPES:
                hint = " (this host stores no items to refer to)" if kind == "item_reference" else ""
                raise PydanticCustomError(
                    "not_served",
                    "input[{index}] is an item of type '{kind}', which this host does not serve{hint}; it takes "
                    "message, function_call and function_call_output items",
                    {"index": index, "kind": kind, "hint": hint},
                )
        return value

    @field_validator("input")
    @classmethod
    def _outputs_follow_their_calls(cls, value):
        # The template shows a result beside the call it answers: a result without its call is
        # one the model cannot read (and this host cannot look the call up: it stores nothing).
        called: set[str] = set()
        for index, item in enumerate(value):
            if isinstance(item, FunctionCallItem):
                called.add(item.call_id)
            elif isinstance(item, FunctionCallOutputItem) and item.call_id not in called:
                raise PydanticCustomError(
                    "unknown_call_id",
                    "input[{index}] answers call_id '{call_id}', but no function_call item with that "
                    "call_id comes before it; send the call too (this host stores no responses)",
                    {"index": index, "call_id": item.call_id},
                )
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value):
        if isinstance(value, list):
            for index, tool in enumerate(value):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if isinstance(kind, str) and kind != "function":
                    raise PydanticCustomError(
                        "not_served",
                        "tools[{index}] is the built-in tool '{kind}', which this host does not serve; "
                        'it serves function tools ({"type": "function", "name", "parameters"})',
                        {"index": index, "kind": kind},
                    )
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice_only(cls, value):
        if isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] != "function":
            raise PydanticCustomError(
                "not_served",
                'tool_choice of type \'{kind}\' is not served; use "none", "auto", "required" or '
                '{"type": "function", "name": ...}',
                {"kind": value["type"]},
            )
        return value

    # --- the chat request it becomes ---------------------------------------------------------------
    def chat_messages(self) -> list[dict]:
        """``instructions`` and ``input`` as chat messages; a reply's calls join its text in one turn."""
        messages: list[dict] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        names: dict[str, str] = {}
        for item in self.input:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": _chat_content(item.content)})
            elif isinstance(item, FunctionCallItem):
                names[item.call_id] = item.name
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append(
                    {"role": "tool", "tool_call_id": item.call_id, "name": names[item.call_id], "content": item.text()}
                )
        return messages

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request that answers this one; only the fields given are set (``relayed`` reads them)."""
        body: dict[str, Any] = {"model": self.model, "messages": self.chat_messages(), "stream": bool(self.stream)}
        given = {
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        body.update({k: v for k, v in given.items() if v is not None})
        if self.text is not None and self.text.format is not None and self.text.format.type != "text":
            body["response_format"] = self.text.format.chat_format()
        if self.tools:
            body["tools"] = [tool.chat_tool() for tool in self.tools]
        if isinstance(self.tool_choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        return parse(ChatCompletionRequest, body)

    # --- what the response object repeats of the request -------------------------------------------
    def echoed(self) -> dict:
        """The request's settings as a ``response`` object reports them."""
        text_format = self.text.format if self.text is not None and self.text.format is not None else None
        fmt = text_format.model_dump(by_alias=True, exclude_none=True) if text_format else {"type": "text"}
        if isinstance(self.tool_choice, FunctionChoice):
            tool_choice: Any = self.tool_choice.model_dump()
        else:
            tool_choice = self.tool_choice or "auto"
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": dict(self.metadata or {}),
            "parallel_tool_calls": bool(self.parallel_tool_calls),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "text": {"format": fmt},
            "tools": [tool.model_dump() for tool in self.tools or []],
            "tool_choice": tool_choice,
            "user": self.user,
            "store": False,
            "truncation": "disabled",
            "background": False,
            "previous_response_id": None,
            "max_tool_calls": None,
            "reasoning": None,
            "service_tier": "default",
        }
