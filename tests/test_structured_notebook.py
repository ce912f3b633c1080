"""Structured output and tools end to end, on the kernel side: a real host with the default model,
a real kernel (jupyter_client) running ``llm_nb.extract`` and ``%%llm_chat --schema``, the Python
API's tool round trip, and ``llm-nb chat --schema FILE``.

Decoding is constrained on the host, so even the 135M default model's replies always validate;
these tests check that they do, not what the model chose to say.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import jsonschema
import pytest

from llm_nb.api import Session
from llm_nb.structured import tool_of

from .conftest import RunningHost, start_host
from .test_kernels import Kernel, text_of

PERSON = """
from pydantic import BaseModel
import llm_nb

class Address(BaseModel):
    city: str
    country: str

class Person(BaseModel):
    name: str
    age: int
    address: Address
"""

TEXT = "Ada Lovelace, 36, lived in London, England, where she wrote the first program."

CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
    },
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city.

    Args:
        city: The city's name.
        unit: celsius or fahrenheit.
    """
    return f"It is 21 degrees {unit} and sunny in {city}."


@pytest.fixture(scope="module")
def structured_host(tmp_path_factory) -> Iterator[RunningHost]:
    host = start_host(tmp_path_factory.mktemp("structured-host"))
    host.client().load("smollm2", keep_alive=-1)
    yield host
    host.stop()


@pytest.fixture(scope="module")
def kernel(structured_host) -> Iterator[Kernel]:
    env = dict(structured_host.env, JPY_SESSION_NAME="structured.ipynb")
    started = Kernel(env, "structured.ipynb")
    try:
        started.ready()
        reply, messages = started.run("%load_ext llm_nb\n" + PERSON)
        assert reply["status"] == "ok", text_of(messages)
        yield started
    finally:
        started.stop()


def test_extract_a_pydantic_model_in_a_real_kernel(kernel):
    code = (
        f"person = llm_nb.extract(Person, {TEXT!r}, max_tokens=120)\n"
        "print('EXTRACTED', type(person).__name__, type(person.address).__name__, person.model_dump_json())\n"
    )
    reply, messages = kernel.run(code)
    shown = text_of(messages)
    assert reply["status"] == "ok", shown
    kind, address_kind, dumped = shown.split("EXTRACTED ", 1)[1].split(" ", 2)
    assert (kind, address_kind) == ("Person", "Address")
    assert set(json.loads(dumped)) == {"name", "age", "address"}


def test_chat_magic_schema_keeps_the_parsed_object_in_a_real_kernel(kernel):
    cell = "%%llm_chat --schema Person -o someone --new --max-tokens 120 --temperature 0\nWho is this? {TEXT}"
    reply, messages = kernel.run(f"TEXT = {TEXT!r}")
    assert reply["status"] == "ok"
    reply, messages = kernel.run(cell)
    shown = text_of(messages)
    assert reply["status"] == "ok", shown
    assert "llm-nb:" not in shown, shown  # no error line
    reply, messages = kernel.run("print('KEPT', type(someone).__name__, isinstance(someone.age, int))")
    assert "KEPT Person True" in text_of(messages), text_of(messages)
    # JSON mode, then the conversation's history has both replies.
    reply, messages = kernel.run(
        "%%llm_chat --json -o data --max-tokens 200 --temperature 0\nHer name and city as a JSON object."
    )
    assert reply["status"] == "ok", text_of(messages)
    assert "llm-nb:" not in text_of(messages), text_of(messages)
    reply, messages = kernel.run("print('JSON', type(data).__name__)")
    assert "JSON dict" in text_of(messages), text_of(messages)


def test_tool_round_trip_through_the_python_api(structured_host):
    session = Session(str(structured_host.connection_file), autostart=False)
    reply = session.chat(
        "What is the weather in Paris?", tools=[get_weather], tool_choice="required", temperature=0, max_tokens=80
    )
    assert reply.finish_reason == "tool_calls", reply
    assert reply.tool_calls and {c.name for c in reply.tool_calls} == {"get_weather"}
    for call in reply.tool_calls:
        jsonschema.validate(call.arguments, tool_of(get_weather)["function"]["parameters"])
    results = reply.run_tools()
    assert all("sunny" in r for r in results)
    answer = session.chat(tools=[get_weather], tool_choice="none", temperature=0, max_tokens=40)
    assert answer.tool_calls == [] and answer.text.strip(), answer
    roles = [m["role"] for m in session.history()]
    assert roles == ["user", "assistant", *["tool"] * len(results), "assistant"]


def test_chat_with_a_named_tool_and_a_schema_from_a_dataclass(structured_host):
    from dataclasses import dataclass

    @dataclass
    class City:
        name: str
        population: int

    session = Session(str(structured_host.connection_file), autostart=False)
    city = session.chat("Name a big city.", schema=City, temperature=0, max_tokens=60, new=True)
    assert isinstance(city, City) and isinstance(city.population, int)
    reply = session.chat("And its weather?", tools=[get_weather], tool_choice=get_weather, max_tokens=80)
    assert [c.name for c in reply.tool_calls] == ["get_weather"]
    jsonschema.validate(reply.tool_calls[0].arguments, tool_of(get_weather)["function"]["parameters"])


def test_cli_chat_schema_file_prints_json_that_validates(structured_host, tmp_path):
    schema_file = tmp_path / "city.json"
    schema_file.write_text(json.dumps(CITY_SCHEMA))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_nb.cli",
            "chat",
            "--schema",
            str(schema_file),
            "--temperature",
            "0",
            "--max-tokens",
            "100",
            "Describe Paris.",
        ],
        env=structured_host.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), CITY_SCHEMA)
