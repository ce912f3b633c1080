"""``POST /v1/responses`` (OpenAI's Responses API) on the chat machinery, with the official ``openai`` client.

The first part checks the request's translation and the event builder without a model; the rest
sends requests to a real host with SmolLM2-135M loaded (llama.cpp), greedy and short. Prompt token
counts are compared with ``/v1/chat/completions``: equal counts mean the same template saw the same
conversation, which is the point of mapping Responses onto chat.
"""

from __future__ import annotations

import json
import os
import re
import signal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from llm_nb.errors import InvalidRequest, ModelCrashed
from llm_nb.host.responses_api import ResponseBuilder
from llm_nb.host.responses_schema import ResponsesRequest
from llm_nb.host.schemas import parse

from .conftest import RunningHost

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
}
ASK_WEATHER = "What is the weather in Paris?"
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "population": {"type": "integer", "minimum": 0}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


class City(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


# --- no model: the translation and the events -------------------------------------------------------
def test_a_request_becomes_the_chat_request_chat_would_be_sent():
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
    request = parse(
        ResponsesRequest,
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                # An earlier response's output, sent back as it came: ids, statuses and annotations included.
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
                },
                dict(call, status="completed"),
                {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
            ],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
            "max_output_tokens": 7,
            "metadata": {"run": "1"},
            "store": False,
        },
    )
    chat = request.chat_request()
    messages = chat.worker_request()["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[0]["content"] == "Be brief."
    # The reply's text and its call are one assistant turn; the result names the function it answers.
    assert messages[2]["content"] == "Let me look." and messages[2]["tool_calls"][0]["id"] == "call_1"
    assert messages[3] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1", "name": "get_weather"}
    assert chat.max_completion_tokens == 7 and chat.tool_choice.function.name == "get_weather"
    assert chat.tools[0].function.parameters == WEATHER["parameters"]
    assert chat.response_format.json_schema.schema_ == CITY
    only_text = parse(ResponsesRequest, {"model": "m", "input": "Hi."}).chat_request()
    assert [m.model_dump(exclude_unset=True) for m in only_text.messages] == [{"role": "user", "content": "Hi."}]
    assert only_text.model_fields_set == {"model", "messages", "stream"}, "nothing a remote would relay"


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "send the whole conversation in input"),
        ({"tools": [{"type": "web_search"}]}, "tools", "built-in tool 'web_search'"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice", "'file_search' is not served"),
        ({"background": True}, "background", "never in the background"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "no reasoning settings"),
        ({"include": ["reasoning.encrypted_content"]}, "include", "no extra output"),
        ({"truncation": "auto"}, "truncation", "context_length_exceeded"),
        ({"conversation": "conv_1"}, "conversation", "keeps no conversations"),
        ({"seed": 3}, "seed", "Extra inputs are not permitted"),
        ({"input": [{"type": "reasoning", "id": "rs_1"}]}, "input", "'reasoning'"),
        ({"input": [{"role": "tool", "content": "18 C"}]}, "input", "function_call_output"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input", "text only"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input", "send the call too"),
        ({"input": []}, "input", "at least one item"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text", 'needs "schema"'),
    ],
)
def test_what_the_host_does_not_serve_is_a_400_that_names_the_field(fields, param, says):
    with pytest.raises(InvalidRequest) as caught:
        parse(ResponsesRequest, {"model": "m", "input": "Hi.", **fields})
    assert caught.value.details["param"] == param and says in caught.value.message, caught.value.message
    # Their "off" values are what clients send by default: accepted.
    off = {"previous_response_id": None, "background": False, "reasoning": {"effort": None}, "include": []}
    assert parse(ResponsesRequest, {"model": "m", "input": "Hi.", "truncation": "disabled", **off})


#: One letter per event, so an event sequence can be checked against the grammar a client expects.
LETTERS = {
    "response.output_item.added": "A",
    "response.content_part.added": "P",
    "response.output_text.delta": "d",
    "response.output_text.done": "T",
    "response.content_part.done": "Q",
    "response.function_call_arguments.delta": "f",
    "response.function_call_arguments.done": "F",
    "response.output_item.done": "Z",
}
#: created, in_progress, then messages and function calls, each whole, then one end.
ORDER = re.compile(r"CI(?:APd*TQZ|AfFZ)+[ENX]")


def event_letters(types: list[str]) -> str:
    ends = {"response.completed": "E", "response.incomplete": "N", "response.failed": "X"}
    starts = {"response.created": "C", "response.in_progress": "I"}
    return "".join(LETTERS.get(t) or ends.get(t) or starts[t] for t in types)


def test_the_builder_closes_each_item_before_the_next_and_numbers_every_event():
    builder = ResponseBuilder("m", {})
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    events = builder.start() + builder.text("Let me ") + builder.text("see.") + builder.call(call)
    events += builder.finish({"finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 9})
    assert ORDER.fullmatch(event_letters([e["type"] for e in events]))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = events[-1]["response"]
    assert [item["type"] for item in done["output"]] == ["message", "function_call"]
    assert done["output"][0]["content"][0]["text"] == "Let me see." and done["output"][1]["arguments"] == '{"a": 1}'
    assert done["status"] == "completed" and done["usage"]["total_tokens"] == 14
    assert events[0]["response"]["output"] == [] and events[0]["response"]["status"] == "in_progress"
    # An empty reply is still one message; a broken one fails, its open message marked incomplete.
    empty = ResponseBuilder("m", {})
    assert empty.finish({"finish_reason": "stop"})[-1]["response"]["output"][0]["content"][0]["text"] == ""
    broken = ResponseBuilder("m", {})
    broken.text("Hal")
    failed = broken.fail(ModelCrashed("the worker died"))[-1]
    assert failed["type"] == "response.failed" and failed["response"]["error"]["code"] == "model_crashed"
    assert failed["response"]["output"][0]["status"] == "incomplete"


# --- through a real host -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oa(shared_host: RunningHost) -> openai.OpenAI:
    return openai.OpenAI(base_url=shared_host.url + "/v1", api_key=shared_host.key, max_retries=0, timeout=60)


def chat_prompt_tokens(oa: openai.OpenAI, messages: list[dict], **fields) -> int:
    return oa.chat.completions.create(model="smollm2", messages=messages, max_tokens=1, **fields).usage.prompt_tokens


def test_a_string_input_is_answered_with_a_response_object(oa):
    response = oa.responses.create(model="smollm2", input="What is 2 + 2?", max_output_tokens=24, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == "smollm2"
    assert response.status == "completed" and response.incomplete_details is None and response.error is None
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.status == "completed" and message.content[0].annotations == []
    assert response.output_text and response.output_text == message.content[0].text
    usage = response.usage
    assert usage.output_tokens > 0 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens == chat_prompt_tokens(oa, [{"role": "user", "content": "What is 2 + 2?"}])
    assert response.text.format.type == "text" and response.tools == [] and response.temperature == 0


def test_instructions_and_a_message_list_make_the_prompt_chat_makes(oa):
    history = [
        {"role": "user", "content": [{"type": "input_text", "text": "Hello."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi! How can I help?"}]},
        {"role": "developer", "content": "Prefer short answers."},
        {"role": "user", "content": "Name a fruit."},
    ]
    response = oa.responses.create(
        model="smollm2", instructions="You are terse.", input=history, max_output_tokens=16, temperature=0
    )
    assert response.output_text and response.instructions == "You are terse."
    as_chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "system", "content": "Prefer short answers."},
        {"role": "user", "content": "Name a fruit."},
    ]
    assert response.usage.input_tokens == chat_prompt_tokens(oa, as_chat)


def test_max_output_tokens_makes_an_incomplete_response_whole_and_streamed(oa):
    ask = {"model": "smollm2", "input": "Tell me a long story about the sea.", "max_output_tokens": 3}
    whole = oa.responses.create(**ask, temperature=0)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output[0].status == "incomplete" and whole.usage.output_tokens == 3 and whole.output_text
    events = list(oa.responses.create(**ask, temperature=0, stream=True))
    assert ORDER.fullmatch(event_letters([e.type for e in events])) and events[-1].type == "response.incomplete"
    last = events[-1].response
    assert last.incomplete_details.reason == "max_output_tokens" and last.usage.output_tokens == 3


def served(host: RunningHost, name: str = "smollm2") -> int:
    return next(m["requests_served"] for m in host.client().status()["models"] if m["name"] == name)


def test_a_stream_sends_its_events_in_order_and_its_text_is_the_final_output_text(oa, shared_host):
    before = served(shared_host)
    with oa.responses.stream(
        model="smollm2",
        input="Name three animals.",
        instructions="Answer in one line.",
        max_output_tokens=120,
        temperature=0,  # sampled, a long answer is cut and ends in response.incomplete instead
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert ORDER.fullmatch(event_letters([e.type for e in events])), [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1, "streamed piece by piece"
    assert "".join(deltas) == final.output_text == events[-4].text  # output_text.done carries the whole text
    assert final.status == "completed" and final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    assert {e.response.id for e in events if hasattr(e, "response")} == {final.id}
    assert served(shared_host) == before + 1, "counted before the client saw the end"


def test_a_json_schema_format_gives_json_that_validates_whole_parsed_and_streamed(oa):
    schema_format = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    response = oa.responses.create(
        model="smollm2", input="A big city, as JSON.", text=schema_format, max_output_tokens=60, temperature=0
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), CITY)
    assert response.text.format.type == "json_schema" and response.text.format.name == "city"

    parsed = oa.responses.parse(
        model="smollm2", input="Name a city and its country.", text_format=City, max_output_tokens=60, temperature=0
    )
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.city
    with oa.responses.stream(
        model="smollm2", input="Another city?", text_format=City, max_output_tokens=60, temperature=0
    ) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, City)


def test_a_required_tool_gives_a_function_call_and_its_output_feeds_a_second_turn(oa):
    ask = {"model": "smollm2", "tools": [WEATHER], "max_output_tokens": 60, "temperature": 0}
    first = oa.responses.create(input=ASK_WEATHER, tool_choice="required", **ask)
    assert first.status == "completed" and [item.type for item in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert first.tool_choice == "required" and first.tools[0].name == "get_weather"

    # Streamed, the call arrives as function_call events and reassembles to the same call.
    with oa.responses.stream(input=ASK_WEATHER, tool_choice={"type": "function", "name": "get_weather"}, **ask) as s:
        events = list(s)
        streamed = s.get_final_response().output[0]
    assert ORDER.fullmatch(event_letters([e.type for e in events])), [e.type for e in events]
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)

    # The next turn: the input so far, the response's output items as the client got them, the result.
    result = json.dumps({"sky": "cloudy", "degrees": 18})
    turn = [{"role": "user", "content": ASK_WEATHER}, *first.output]
    turn.append({"type": "function_call_output", "call_id": call.call_id, "output": result})
    second = oa.responses.create(input=turn, tool_choice="none", **ask)
    assert second.output_text and [item.type for item in second.output] == ["message"]
    as_chat = [
        {"role": "user", "content": ASK_WEATHER},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": result},
    ]
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    assert second.usage.input_tokens == chat_prompt_tokens(oa, as_chat, tools=[chat_tool], tool_choice="none")


def test_bad_requests_are_clear_errors_and_the_host_answers_on(oa):
    bad_schema = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}
    for fields, status, code, param in [
        ({"previous_response_id": "resp_abc"}, 400, "invalid_request", "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, 400, "invalid_request", "tools"),
        ({"text": bad_schema}, 400, "invalid_schema", "text.format.schema"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, 400, "invalid_tool_choice", None),
        ({"model": "not-loaded"}, 404, "model_not_found", None),
    ]:
        for stream in (False, True):  # streamed or not, an error before the stream starts is a plain status
            with pytest.raises(openai.APIStatusError) as caught:
                oa.responses.create(**{"model": "smollm2", "input": "Hi.", "stream": stream, **fields})
            error = caught.value
            assert error.status_code == status and error.code == code, error.message
            assert param is None or error.param == param, error.body
    with pytest.raises(openai.BadRequestError) as caught:
        oa.responses.create(model="smollm2", input="Hi.", previous_response_id="resp_abc")
    assert "send the whole conversation in input" in caught.value.message
    assert oa.responses.create(model="smollm2", input="Say hi.", max_output_tokens=4, temperature=0).output_text


def test_a_remote_engine_answers_through_chat_with_tools_relayed(oa, shared_host, monkeypatch):
    # The host itself as the remote: its own /v1 serves chat completions, as vLLM would.
    monkeypatch.setenv("LLM_NB_TEST_REMOTE_KEY", shared_host.key)
    client = shared_host.client()
    client.load(
        "smollm2",
        name="via-remote",
        backend="remote",
        url=shared_host.url,
        remote_model="smollm2",
        api_key_env="LLM_NB_TEST_REMOTE_KEY",
    )
    try:
        plain = oa.responses.create(model="via-remote", input="Name a colour.", max_output_tokens=8, temperature=0)
        assert plain.model == "via-remote" and plain.output_text
        assert plain.usage.input_tokens == chat_prompt_tokens(oa, [{"role": "user", "content": "Name a colour."}])
        with oa.responses.stream(
            model="via-remote",
            input=ASK_WEATHER,
            tools=[WEATHER],
            tool_choice="required",
            max_output_tokens=60,
            temperature=0,
        ) as stream:
            final = stream.get_final_response()
        call = final.output[0]
        assert call.type == "function_call" and call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
        # Relayed with a format, the output limit still reaches the remote.
        cut = oa.responses.create(
            model="via-remote", input="A city, as JSON.", text={"format": {"type": "json_object"}}, max_output_tokens=3
        )
        assert cut.status == "incomplete" and cut.usage.output_tokens == 3
    finally:
        client.unload("via-remote")


def test_a_worker_that_dies_mid_stream_fails_the_response_in_band(oa, shared_host):
    client = shared_host.client()
    client.load("smollm2", name="victim", options={"n_ctx": 512})
    pid = next(m["worker_pid"] for m in client.status()["models"] if m["name"] == "victim")
    events = []
    try:
        stream = oa.responses.create(
            model="victim", input="Tell me a long story about the sea.", max_output_tokens=400, stream=True
        )
        for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta" and len(events) == 5:
                os.kill(pid, signal.SIGKILL)
    finally:
        client.unload("victim", force=True)
    assert event_letters([e.type for e in events]).endswith("X")
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "model_crashed" and "SIGKILL" in failed.error.message
    assert failed.output[0].status == "incomplete" and failed.output[0].content[0].text
    assert oa.responses.create(model="smollm2", input="Still there?", max_output_tokens=4).output_text
