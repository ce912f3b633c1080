"""The kernel side of structured output and tools, with no host: schemas from Python types, replies
validated back into them, tools from functions, and what the API, the magics, the CLI and the widget
panel send and keep. A scripted stream stands in for the host (``Session._open``)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from typing import Literal

import pytest
import typing_extensions
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from pydantic import BaseModel, Field

from llm_nb import cli
from llm_nb.api import Session
from llm_nb.client import ChatStream
from llm_nb.errors import InvalidRequest, StructuredOutputError
from llm_nb.magics import LlmMagics
from llm_nb.streams import Reply
from llm_nb.structured import (
    ToolCall,
    json_schema_of,
    response_format_of,
    tool_choice_of,
    tool_of,
    validate_as,
)


# --- schemas -------------------------------------------------------------------------------------
class Address(BaseModel):
    city: str
    country: str = "France"


class Person(BaseModel):
    """Someone named in the text."""

    name: str = Field(description="full name")
    age: int
    nickname: str | None = None
    address: Address


@dataclasses.dataclass
class Book:
    title: str
    year: int = 2000
    tags: list[str] = dataclasses.field(default_factory=list)


class Movie(typing.TypedDict):  # typing's, which pydantic refuses on Python 3.11 unless rebuilt
    title: str
    rating: typing.NotRequired[float]


class Song(typing_extensions.TypedDict):
    title: str
    seconds: int


CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer", "minimum": 0}},
    "required": ["city"],
}


def test_a_pydantic_model_gives_a_closed_schema_keeping_optional_fields_optional():
    schema = json_schema_of(Person)
    assert schema["required"] == ["name", "age", "address"]  # nickname has a default: optional
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Address"]["additionalProperties"] is False  # nested objects too
    assert schema["$defs"]["Address"]["required"] == ["city"]
    assert schema["properties"]["name"]["description"] == "full name"
    assert schema["description"] == "Someone named in the text."


def test_dataclasses_and_both_typeddicts_give_schemas():
    book = json_schema_of(Book)
    assert book["required"] == ["title"] and book["additionalProperties"] is False
    assert book["properties"]["tags"]["type"] == "array"
    movie = json_schema_of(Movie)
    assert movie["required"] == ["title"] and set(movie["properties"]) == {"title", "rating"}
    assert json_schema_of(Song)["required"] == ["title", "seconds"]


def test_a_dict_is_taken_as_the_schema_itself_and_never_changed():
    schema = json_schema_of(CITY_SCHEMA)
    assert schema == CITY_SCHEMA and schema is not CITY_SCHEMA
    assert "additionalProperties" not in CITY_SCHEMA


def test_response_format_is_strict_json_schema_named_for_the_type():
    fmt = response_format_of(Person)
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "Person" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == json_schema_of(Person)
    assert response_format_of({"title": "a city!", **CITY_SCHEMA})["json_schema"]["name"] == "a_city_"
    assert response_format_of("json") == {"type": "json_object"}


def test_a_type_pydantic_cannot_model_is_a_clear_error():
    with pytest.raises(InvalidRequest, match="cannot derive a JSON schema"):
        json_schema_of(object())


# --- validation -----------------------------------------------------------------------------------
def test_replies_validate_into_instances_of_each_kind():
    person = validate_as(Person, '{"name": "Ada", "age": 36, "address": {"city": "London"}}')
    assert isinstance(person, Person) and person.address.country == "France"
    assert validate_as(Book, '{"title": "Dune", "year": 1965}') == Book("Dune", 1965)
    assert validate_as(Movie, '{"title": "Heat"}') == {"title": "Heat"}
    assert validate_as(CITY_SCHEMA, '{"city": "Paris", "population": 2100000}')["city"] == "Paris"
    assert validate_as(None, "[1, 2]") == [1, 2]
    assert validate_as(Book, {"title": "parsed already"}).title == "parsed already"


@pytest.mark.parametrize(
    "schema, raw, says",
    [
        (Person, '{"name": "Ada"}', "does not validate as Person"),
        (Person, '{"name": "Ada", "age": 36, "addr', "not valid JSON"),
        (CITY_SCHEMA, '{"city": "Paris", "population": -3}', "at population"),
        (CITY_SCHEMA, '{"population": 3}', "'city' is a required property"),
        (Book, "I think the book is Dune.", "not valid JSON"),
    ],
)
def test_a_reply_that_does_not_fit_raises_with_the_raw_text(schema, raw, says):
    with pytest.raises(StructuredOutputError, match=says) as caught:
        validate_as(schema, raw)
    assert caught.value.raw == raw
    assert caught.value.code == "invalid_output"


def test_a_reply_cut_at_max_tokens_says_so():
    with pytest.raises(StructuredOutputError, match="cut at max_tokens"):
        validate_as(Person, '{"name": "Ad', finish_reason="length")


# --- tools ------------------------------------------------------------------------------------------
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int = 1) -> str:
    """Get the weather forecast for a city.

    Uses the forecast service; results are cached.

    Args:
        city: The city's name,
            in English.
        unit (str): Temperature unit.
        days: How many days ahead.

    Returns:
        A one-line forecast.
    """
    return f"{city}: sunny, 21 degrees {unit} for {days} day(s)"


def book_flight(origin, destination: Address, when: str = "today", *extra, **options):
    """Book a flight.

    Parameters
    ----------
    origin : str
        Where from.
    destination : Address
        Where to,
        city and country.
    """
    return {"from": origin, "to": destination.city, "when": when}


def test_a_function_becomes_a_tool_from_its_signature_and_docstring():
    tool = tool_of(get_weather)
    assert tool["type"] == "function"
    spec = tool["function"]
    assert spec["name"] == "get_weather"
    assert spec["description"] == "Get the weather forecast for a city."
    params = spec["parameters"]
    assert params["type"] == "object" and params["additionalProperties"] is False
    assert params["required"] == ["city"]  # defaults make the others optional
    assert params["properties"]["city"]["description"] == "The city's name, in English."
    assert params["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert params["properties"]["unit"]["default"] == "celsius"
    assert params["properties"]["days"] == {
        "default": 1,
        "description": "How many days ahead.",
        "title": "Days",
        "type": "integer",
    }


def test_numpy_docstrings_nested_models_and_unannotated_parameters():
    params = tool_of(book_flight)["function"]["parameters"]
    assert set(params["properties"]) == {"origin", "destination", "when"}  # *extra, **options have no schema
    assert params["required"] == ["origin", "destination"]
    assert params["properties"]["origin"]["description"] == "Where from."
    assert params["properties"]["destination"]["description"] == "Where to, city and country."
    assert params["$defs"]["Address"]["additionalProperties"] is False


def test_tool_dicts_pass_as_they_are_and_nameless_functions_are_refused():
    made = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert tool_of(made) == made
    with pytest.raises(InvalidRequest, match="needs a name"):
        tool_of(lambda x: x)


def test_tool_choice_takes_a_function_or_its_name():
    assert tool_choice_of(get_weather) == {"type": "function", "function": {"name": "get_weather"}}
    assert tool_choice_of("get_weather") == tool_choice_of(get_weather)
    assert [tool_choice_of(c) for c in ("auto", "none", "required", None)] == ["auto", "none", "required", None]


def test_a_tool_call_runs_with_arguments_validated_against_the_hints():
    call = ToolCall.from_openai(
        {
            "id": "call_1",
            "function": {"name": "book_flight", "arguments": '{"origin": "Paris", "destination": {"city": "Rome"}}'},
        },
        {"book_flight": book_flight},
    )
    assert (call.id, call.name) == ("call_1", "book_flight")
    assert call.run() == {"from": "Paris", "to": "Rome", "when": "today"}  # a dict became an Address
    message = call.message(call.run())
    assert message["role"] == "tool" and message["tool_call_id"] == "call_1"
    assert json.loads(message["content"]) == {"from": "Paris", "to": "Rome", "when": "today"}
    assert call.to_openai()["function"]["name"] == "book_flight"


def test_tool_calls_that_cannot_run_say_why():
    functions = {"get_weather": get_weather}
    bad_json = {"id": "c", "function": {"name": "get_weather", "arguments": '{"city": '}}
    with pytest.raises(StructuredOutputError) as caught:
        ToolCall.from_openai(bad_json, functions)
    assert caught.value.raw == '{"city": '
    wrong_type = ToolCall("c", "get_weather", {"city": "Oslo", "days": "many"}, get_weather)
    with pytest.raises(StructuredOutputError, match="do not fit its signature"):
        wrong_type.run()
    with pytest.raises(InvalidRequest, match="not one of the Python functions"):
        ToolCall("c", "launch", {}, None).run()


def test_positional_only_parameters_are_passed_by_position():
    def power(base: float, exponent: int = 2, /) -> float:
        return base**exponent

    assert ToolCall("c", "power", {"base": "3", "exponent": 3}, power).run() == 27


# --- the stream, the session and its conversation --------------------------------------------------
def chunk(**delta) -> dict:
    return {"choices": [{"index": 0, "delta": delta}]}


def sse(*chunks: dict, finish: str = "stop") -> list[bytes]:
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "usage": {"completion_tokens": 5}}
    return [f"data: {json.dumps(c)}\n".encode() for c in (*chunks, end)] + [b"data: [DONE]\n"]


def text_reply(text: str, finish: str = "stop") -> list[bytes]:
    half = len(text) // 2
    return sse(chunk(content=text[:half]), chunk(content=text[half:]), finish=finish)


def tool_reply(name: str, arguments: dict, call_id: str = "call_abc") -> list[bytes]:
    """Tool calls as the host streams them: the name first, then the arguments in pieces."""
    args = json.dumps(arguments)
    return sse(
        chunk(
            tool_calls=[{"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]
        ),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": args[:5]}}]),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": args[5:]}}]),
        finish="tool_calls",
    )


class ScriptedHost:
    """Stands in for ``Session._open``: records each request body, answers the next scripted stream."""

    def __init__(self, *replies: list[bytes]):
        self.replies = list(replies)
        self.bodies: list[dict] = []

    def __call__(self, body: dict, on_progress, load_fields) -> ChatStream:
        self.bodies.append(json.loads(json.dumps(body)))
        return ChatStream(iter(self.replies.pop(0)), lambda: None)


def scripted(*replies: list[bytes]) -> tuple[Session, ScriptedHost]:
    session = Session("/nonexistent/host.json", autostart=False)
    host = ScriptedHost(*replies)
    session._open = host
    return session, host


def test_the_stream_reassembles_tool_call_pieces():
    reply = Reply()
    for line in tool_reply("get_weather", {"city": "Paris"}):
        reply.take_line(line)
    assert reply.tool_calls == [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert reply.finish_reason == "tool_calls" and reply.first_token_s is not None


def test_extract_asks_for_strict_json_greedily_outside_the_conversation():
    session, host = scripted(text_reply('{"name": "Ada Lovelace", "age": 36, "address": {"city": "London"}}'))
    person = session.extract(Person, "Ada Lovelace, 36, lived in London.")
    assert person == Person(name="Ada Lovelace", age=36, address=Address(city="London"))
    body = host.bodies[0]
    assert body["response_format"] == response_format_of(Person)
    assert body["temperature"] == 0
    assert body["messages"][-1]["role"] == "user"
    assert body["messages"][-1]["content"].startswith("Extract the information from the text as JSON")
    assert body["messages"][-1]["content"].endswith("Ada Lovelace, 36, lived in London.")
    assert session.history() == []  # extraction is not part of the conversation


def test_extract_with_instructions_and_a_reply_that_does_not_fit():
    session, host = scripted(text_reply('{"name": "Ada"}'))
    with pytest.raises(StructuredOutputError) as caught:
        session.extract(Person, "Ada.", instructions="Find the person.", model="other")
    assert caught.value.raw == '{"name": "Ada"}'
    assert host.bodies[0]["model"] == "other"
    assert host.bodies[0]["messages"][-1]["content"].startswith("Find the person.\n\n")


def test_chat_with_a_schema_returns_the_value_and_keeps_the_conversation():
    session, host = scripted(text_reply('{"title": "Dune", "year": 1965}'))
    assert session.chat("A famous sci-fi book?", schema=Book) == Book("Dune", 1965, [])
    assert host.bodies[0]["response_format"]["json_schema"]["name"] == "Book"
    assert [m["role"] for m in session.history()] == ["user", "assistant"]


def test_chat_with_response_format_passes_it_and_parses_json_schema_replies():
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    session, host = scripted(text_reply('{"city": "Paris"}'), text_reply('{"city": -1}'))
    assert session.chat("A capital?", response_format=fmt) == '{"city": "Paris"}'  # text, as before
    assert host.bodies[0]["response_format"] == fmt
    with pytest.raises(StructuredOutputError, match="at city"):
        session.stream("Another?", response_format=fmt).parse()
    with pytest.raises(InvalidRequest, match="not both"):
        session.stream("x", schema=Book, response_format=fmt)


def test_a_tool_round_trip_keeps_calls_and_results_in_the_conversation():
    session, host = scripted(
        tool_reply("get_weather", {"city": "Paris", "unit": "celsius"}),
        text_reply("It is sunny in Paris."),
    )
    reply = session.chat("What is the weather in Paris?", tools=[get_weather], tool_choice="required")
    first = host.bodies[0]
    assert first["tools"] == [tool_of(get_weather)] and first["tool_choice"] == "required"
    assert reply.text == "" and reply.finish_reason == "tool_calls"
    assert repr(reply) == """ChatReply('', tool_calls=[get_weather({"city": "Paris", "unit": "celsius"})])"""
    [call] = reply.tool_calls
    assert (call.id, call.name, call.arguments) == ("call_abc", "get_weather", {"city": "Paris", "unit": "celsius"})
    assert reply.run_tools() == ["Paris: sunny, 21 degrees celsius for 1 day(s)"]

    answer = session.chat(tools=[get_weather])  # no prompt: the model answers from the results
    assert answer.text == "It is sunny in Paris." and answer.tool_calls == []
    sent = host.bodies[1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]  # no new user message
    assert sent[1]["content"] is None
    assert sent[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris", "unit": "celsius"}',
    }
    assert sent[2] == {
        "role": "tool",
        "tool_call_id": "call_abc",
        "name": "get_weather",
        "content": "Paris: sunny, 21 degrees celsius for 1 day(s)",
    }
    assert [m["role"] for m in session.history()] == ["user", "assistant", "tool", "assistant"]


def test_no_prompt_without_tool_results_is_refused():
    session, _ = scripted()
    with pytest.raises(InvalidRequest, match="only answers tool results"):
        session.chat()


def test_a_named_tool_choice_and_a_result_added_by_hand():
    session, host = scripted(tool_reply("get_weather", {"city": "Oslo"}, "call_9"), text_reply("Cold."))
    reply = session.stream("Oslo?", tools=[get_weather], tool_choice=get_weather)
    reply.read()
    assert host.bodies[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    message = reply.add_tool_result(reply.tool_calls[0], {"forecast": "snow"})
    assert message["content"] == '{"forecast": "snow"}' and reply.tool_messages == [message]
    assert session.chat() == "Cold."  # no tools this turn: plain text


# --- the magics ---------------------------------------------------------------------------------------
@pytest.fixture
def shell():
    ip = InteractiveShell.instance()
    saved = ip.display_pub
    ip.display_pub = CapturingDisplayPublisher()
    yield ip
    ip.display_pub = saved


def scripted_magics(shell, *replies) -> tuple[LlmMagics, ScriptedHost]:
    session, host = scripted(*replies)
    magics = LlmMagics(shell, session=session)
    magics.live = "display"
    shell.register_magics(magics)
    return magics, host


def shown(shell) -> str:
    return shell.display_pub.outputs[-1]["data"]["text/markdown"]


def test_chat_magic_schema_keeps_the_parsed_object(shell):
    _, host = scripted_magics(shell, text_reply('{"title": "Dune", "year": 1965}'))
    shell.user_ns["Book"] = Book
    shell.user_ns.pop("book", None)
    shell.run_cell_magic("llm_chat", "--schema Book -o book", "A sci-fi classic?")
    assert shell.user_ns["book"] == Book("Dune", 1965)
    assert host.bodies[0]["response_format"] == response_format_of(Book)
    assert shown(shell).startswith('```json\n{\n  "title": "Dune",\n  "year": 1965\n}\n```')  # pretty


def test_chat_magic_json_mode_and_a_dict_schema_by_attribute_path(shell):
    _, host = scripted_magics(shell, text_reply('{"a": [1, 2]}'), text_reply('{"city": "Rome"}'))
    shell.run_cell_magic("llm_chat", "--json -o data", "Some JSON?")
    assert shell.user_ns["data"] == {"a": [1, 2]}
    assert host.bodies[0]["response_format"] == {"type": "json_object"}

    class Schemas:
        city = CITY_SCHEMA

    shell.user_ns["schemas"] = Schemas
    shell.run_cell_magic("llm_chat", "--schema schemas.city -o place", "A city?")
    assert shell.user_ns["place"] == {"city": "Rome"}
    assert host.bodies[1]["response_format"]["json_schema"]["schema"] == CITY_SCHEMA


def test_chat_magic_errors_are_one_line_and_leave_the_variable_alone(shell, capsys):
    scripted_magics(shell, text_reply('{"title": 5}'))
    shell.user_ns["Book"] = Book
    shell.user_ns["kept"] = "before"
    shell.run_cell_magic("llm_chat", "--schema Book -o kept", "A book?")
    err = capsys.readouterr().err
    assert err.startswith("llm-nb: the reply does not validate as Book") and err.count("\n") == 1
    assert shell.user_ns["kept"] == "before"
    assert '"title": 5' in shown(shell)  # the reply that failed stays in view

    result = shell.run_cell("%%llm_chat --schema NoSuchSchema\nx")
    assert "'NoSuchSchema' is not defined" in capsys.readouterr().err
    assert result.error_in_exec is not None and "Traceback" not in str(result.error_in_exec)
    shell.run_cell("%%llm_chat --json --schema Book\nx")
    assert "not both" in capsys.readouterr().err


def test_history_magic_shows_tool_calls(shell):
    magics, _ = scripted_magics(shell, tool_reply("get_weather", {"city": "Oslo"}))
    magics.session.chat("Oslo?", tools=[get_weather]).run_tools()
    shell.run_line_magic("llm_history", "")
    plain = shell.display_pub.outputs[-1]["data"]["text/plain"]
    assert '→ get_weather({"city": "Oslo"})' in plain and "[tool]\nOslo: sunny" in plain


# --- the command line and the widget panel ----------------------------------------------------------
def test_cli_chat_schema_file_prints_the_validated_json(tmp_path, monkeypatch, capsys):
    host = ScriptedHost(text_reply('{"city":"Lyon","population":500000}'), text_reply('{"x": 1}'))
    monkeypatch.setattr(Session, "_open", lambda self, body, progress, fields: host(body, progress, fields))
    schema_file = tmp_path / "city.json"
    schema_file.write_text(json.dumps(CITY_SCHEMA))
    assert cli.main(["chat", "--schema", str(schema_file), "A city in France?"]) == 0
    assert json.loads(capsys.readouterr().out) == {"city": "Lyon", "population": 500000}
    assert host.bodies[0]["response_format"]["json_schema"]["schema"] == CITY_SCHEMA
    assert cli.main(["chat", "--json", "JSON?"]) == 0
    assert capsys.readouterr().out == '{\n  "x": 1\n}\n'
    assert host.bodies[1]["response_format"] == {"type": "json_object"}


def test_cli_chat_schema_errors(tmp_path, monkeypatch, capsys):
    host = ScriptedHost(text_reply('{"population": 1}'))
    monkeypatch.setattr(Session, "_open", lambda self, body, progress, fields: host(body, progress, fields))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["chat", "--schema", str(bad), "x"]) == 1
    assert "--schema takes a file holding a JSON schema" in capsys.readouterr().err
    good = tmp_path / "city.json"
    good.write_text(json.dumps(CITY_SCHEMA))
    assert cli.main(["chat", "--schema", str(good), "x"]) == 1
    assert "'city' is a required property" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["chat", "--json", "--schema", str(good), "x"])


def test_widget_panel_json_reply_with_and_without_a_schema():
    pytest.importorskip("ipywidgets")
    from llm_nb.widgets import Panel

    session, host = scripted(text_reply('{"city": "Nice"}'), text_reply('{"any": true}'))
    panel = Panel(session, interval=60)
    try:
        assert panel.schema.layout.display == "none"
        panel.json_reply.value = True
        assert panel.schema.layout.display is None  # the schema box shows with the JSON checkbox
        panel.schema.value = json.dumps(CITY_SCHEMA)
        panel.prompt.value = "A city?"
        panel._chat()
        assert panel.parsed == {"city": "Nice"}
        assert host.bodies[0]["response_format"]["json_schema"]["schema"] == CITY_SCHEMA
        panel.schema.value = ""
        panel.prompt.value = "Anything?"
        panel._chat()
        assert panel.parsed == {"any": True}
        assert host.bodies[1]["response_format"] == {"type": "json_object"}
        panel.schema.value = "{oops"
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            panel._schema()
    finally:
        panel.close()


def test_structured_is_kernel_side_and_import_llm_nb_stays_light():
    code = (
        "import sys, llm_nb, llm_nb.api, llm_nb.magics\n"
        "light = sorted({'pydantic', 'jsonschema', 'llm_nb.structured'} & set(sys.modules))\n"
        "import llm_nb.structured\n"
        "heavy = {'torch', 'transformers', 'llama_cpp', 'llguidance', 'llm_nb.host', 'llm_nb.backends'}\n"
        "print(light, sorted(heavy & set(sys.modules)), llm_nb.extract.__module__, llm_nb.ToolCall.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["[]", "[]", "llm_nb.api", "llm_nb.structured"]
