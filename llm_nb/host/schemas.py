"""Request shapes of the host's public routes, validated strictly.

Strict validation turns wrong types into a 400 that names the field, instead
of a surprise deep inside a backend; the same models describe the routes in
the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from ..errors import InvalidRequest
from .structured import chosen_tools, grammar_for

MAX_TOKENS_LIMIT = 1_000_000
StopStr = Annotated[str, Field(min_length=1, max_length=256)]


def parse(model: type[BaseModel], body: Any):
    """Validate ``body`` against ``model``; errors name the fields at fault."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(p) for p in error["loc"]) or "body"
            problems.append(f"{where}: {error['msg']}")
        raise InvalidRequest(
            "invalid request: " + "; ".join(problems),
            param=str(exc.errors()[0]["loc"][0]) if exc.errors() and exc.errors()[0]["loc"] else None,
        ) from None


class _Base(BaseModel):
    # OpenAI clients send fields we do not use (user, logit_bias, metadata...): ignore them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Base):
    type: Literal["text"]
    text: str


#: As OpenAI allows them (a name is also a grammar literal and a Python identifier on the kernel side).
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(_Base):
    name: ToolName
    arguments: str = Field(max_length=1_000_000, description="the arguments, as a JSON string")


class ToolCall(_Base):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self):
        # A tool result that names no call, or calls on a user turn, would reach the template malformed.
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError('a "tool" message needs the tool_call_id of the call it answers')
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f'tool_calls belong to "assistant" messages, not "{self.role}"')
        return self

    def worker_message(self) -> dict:
        """The message as a chat template takes it (``developer`` is ``system`` to templates)."""
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
            out["content"] = self.text() or None
        if self.role == "tool":
            out.update(tool_call_id=self.tool_call_id, name=self.name)
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Base):
    include_usage: bool = False


class JsonSchemaFormat(_Base):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def as_dict(self) -> dict:
        out: dict = {"type": self.type}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidRequest(
                    'response_format {"type": "json_schema"} needs "json_schema": {"name", "schema"}',
                    param="response_format",
                )
            out["json_schema"] = {
                "name": self.json_schema.name,
                "schema": self.json_schema.schema_,
                "strict": self.json_schema.strict,
            }
        return out


class FunctionDefinition(_Base):
    name: ToolName
    description: str | None = Field(None, max_length=100_000)
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Base):
    name: ToolName


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: NamedFunction


class SamplingParams(_Base):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, ge=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: StopStr | list[StopStr] | None = None
    n: int = Field(1, ge=1, le=8, description="choices to generate (1 to 8)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(
        None,
        description="json_object or json_schema: decoding is constrained to it (a schema that cannot compile: 400)",
    )

    @field_validator("n", mode="before")
    @classmethod
    def _null_is_one(cls, value):
        return 1 if value is None else value  # OpenAI clients may send "n": null

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        if isinstance(value, list) and len(value) > 8:
            raise ValueError("at most 8 stop sequences")
        return value

    #: How many alternatives each token's logprob comes with (None: no logprobs); set by the subclasses.
    def top_logprobs_asked(self) -> int | None:
        return None

    def constraints(self) -> dict:
        """``grammar`` (and ``tools``) for the worker; the grammar is validated here (a 400 if it cannot compile)."""
        fmt = self.response_format.as_dict() if self.response_format else None
        grammar = grammar_for(fmt, [], "none")
        return {"grammar": grammar} if grammar else {}

    def generation(self, **fields: Any) -> dict:
        """The worker's GenerationRequest as JSON.

        ``stream`` is for a remote engine, which answers a whole request whole (with exact
        usage); a worker streams its events either way.
        """
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        out = {
            "logprobs": self.top_logprobs_asked(),
            "stream": self.stream,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": stops,
        }
        out.update(fields)
        return {k: v for k, v in out.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    tools: list[Tool] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="required or a named function: the call is constrained to the tool's parameters"
    )
    # Off unless asked (OpenAI defaults it on; llama.cpp's server, like us, off): SmolLM2 given
    # room for more calls under tool_choice "required" repeats its call up to the limit, every time.
    parallel_tool_calls: bool | None = Field(
        None, description="allow up to 8 calls in one forced reply; off unless true, as in llama.cpp's server"
    )
    logprobs: bool | None = Field(None, description="each token's logprob, of the model's raw distribution")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (needs logprobs)")

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def callable_tools(self) -> tuple[list[dict], str]:
        """The tools the model may call and how ("none", "auto" or "required"), after tool_choice."""
        tools = [tool.model_dump(exclude_none=True) for tool in self.tools or []]
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        return chosen_tools(tools, choice)

    def constraints(self) -> dict:
        tools, mode = self.callable_tools()
        fmt = self.response_format.as_dict() if self.response_format else None
        out: dict = {"grammar": grammar_for(fmt, tools, mode, bool(self.parallel_tool_calls))}
        if mode != "none":
            out["tools"] = tools
        return {k: v for k, v in out.items() if v is not None}

    def worker_request(self) -> dict:
        messages = [m.worker_message() for m in self.messages]
        return self.generation(
            kind="chat",
            messages=messages,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            **self.constraints(),
        )


class CompletionRequest(SamplingParams):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (the legacy field)")

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not served by llm-nb")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix (fill-in-the-middle) is not served by llm-nb")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string, or a list of one string)")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def worker_request(self) -> dict:
        return self.generation(kind="completion", prompt=self.prompt_text(), **self.constraints())


class EmbeddingRequest(_Base):
    model: str = Field(min_length=1, max_length=256)
    # As OpenAI takes it: a text, texts, one text as token ids, or texts as token ids
    # (LangChain's OpenAIEmbeddings sends token ids by default).
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _bounded(cls, value):
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        if isinstance(value, list) and value and isinstance(value[0], list | int):
            rows = value if isinstance(value[0], list) else [value]
            if any(not row for row in rows):
                raise ValueError("a list of token ids must not be empty")
            if any(token < 0 for row in rows for token in row):
                raise ValueError("token ids are non-negative integers")
        return value

    def inputs(self) -> list[str | list[int]]:
        """One item per vector: a text, or a text as token ids."""
        if isinstance(self.input, str) or isinstance(self.input[0], int):
            return [self.input]
        return list(self.input)


class ClientInfo(_Base):
    id: str | None = Field(None, max_length=200)
    name: str | None = Field(None, max_length=300)
    pid: int | None = Field(None, ge=1, le=2**31)
    pid_started: float | None = None
    hostname: str | None = Field(None, max_length=255, description="where pid runs (a user's server may be elsewhere)")
    server: str | None = Field(None, max_length=255, description="hub mode: the user's named server ('' the default)")


class LoadRequest(_Base):
    model: str | None = Field(None, max_length=4096)
    name: str | None = Field(None, max_length=128)
    backend: str | None = Field(None, max_length=32)
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: float | int | str | None = None
    chat_format: str | None = Field(None, max_length=64)
    url: str | None = Field(None, max_length=2048)
    remote_model: str | None = Field(None, max_length=512)
    api_key_env: str | None = Field(None, max_length=256)
    api_key: str | None = Field(
        None, max_length=4096, description="a remote's key, read from api_key_env by the client"
    )
    task: str | None = Field(None, max_length=64)
    client: ClientInfo | None = None
    stream: bool = False


class UnloadRequest(_Base):
    model: str | None = Field(None, max_length=256)
    all: bool = False
    force: bool = False
    client: ClientInfo | None = None


class InferTensor(_Base):
    name: str
    shape: list[int]
    datatype: str
    data: list
    parameters: dict | None = None


class InferRequest(_Base):
    """KServe v2 infer body; the route checks shapes and datatypes itself, with pointed messages."""

    id: str | None = None
    parameters: dict | None = None
    inputs: list[InferTensor]


class TokenRequest(_Base):
    """``POST /api/token``: a session token for some deployments or models (``*``: all)."""

    scope: str | list[Annotated[str, Field(max_length=256)]] | None = None
    ttl: float | int = Field(3600, description="seconds the token lives")


class DeployRequest(_Base):
    name: str = Field(max_length=128, description="served at /models/<name>/")
    folder: str = Field(max_length=4096, description="the folder with model.py (and model.json), on the host")
    stream: bool = False
    engine: Literal["local", "ray"] = Field("local", description="a worker of the host's, or replicas on Ray Serve")
    replicas: int | None = Field(None, ge=1, le=1024, description="engine=ray: how many replicas (default 1)")
    autoscaling: dict[str, Any] | None = Field(
        None, description="engine=ray: Ray Serve's autoscaling_config (min_replicas, max_replicas, ...)"
    )
    ray_actor_options: dict[str, Any] | None = Field(
        None, description="engine=ray: each replica's Ray actor options (num_cpus, num_gpus, memory, runtime_env)"
    )
    wait_for_resources: float | None = Field(
        None,
        ge=0,
        le=86400,
        description="engine=ray: seconds to wait for replicas the cluster cannot place now (default 120 without "
        "an autoscaler; 0: refuse at once with 409)",
    )


class UndeployRequest(_Base):
    name: str = Field(max_length=128)


class UseModelRequest(_Base):
    """``POST /api/deployments/{name}/use``: a lease on a host model for that deployment's model.py."""

    model: str = Field(max_length=4096)
    name: str | None = Field(None, max_length=128)
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: float | int | str | None = None


class PredictPayload(BaseModel):
    """A deployment's payload: whatever its model.py reads; the Practicus-style keys are these."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    user_prompt: str | None = None
    system_context: str | None = None
