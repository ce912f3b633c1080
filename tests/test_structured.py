"""Structured output, tools, logprobs and n through a real host, on the default model and both local backends.

The first part checks the host's grammar building and tool-call reading without a
model; the rest sends OpenAI requests with the official ``openai`` client to
SmolLM2-135M loaded by llama.cpp and by transformers (the same GGUF). Decoding is
constrained, so a 135M model's replies must validate every time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from llm_nb.errors import InvalidRequest
from llm_nb.host import structured
from llm_nb.host.schemas import ChatCompletionRequest, parse
from llm_nb.host.shaping import legacy_logprobs
from llm_nb.host.structured import CallSplitter, grammar_for, parse_calls
from llm_nb.tool_format import render_call, template_messages

from .conftest import RunningHost, start_host

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"$ref": "#/$defs/address"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "member": {"type": "boolean"},
        "nickname": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "address", "tags", "score", "member"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- the host's side, no model -------------------------------------------------------------------
def test_a_schema_the_engine_cannot_compile_names_its_part():
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"type": "strin"}}}}}
    with pytest.raises(InvalidRequest) as caught:
        grammar_for(bad, [], "none")
    assert caught.value.code == "invalid_schema" and "response_format.json_schema.schema" in caught.value.message
    lookbehind = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": lookbehind}}
    with pytest.raises(InvalidRequest) as caught:
        grammar_for(None, [WEATHER, tool], "required")
    assert caught.value.code == "invalid_schema" and "tools[1].function.parameters" in caught.value.message


def test_tool_choice_must_name_a_tool_that_was_given():
    with pytest.raises(InvalidRequest) as caught:
        structured.chosen_tools([WEATHER], {"type": "function", "function": {"name": "nope"}})
    assert caught.value.code == "invalid_tool_choice" and "get_weather" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        structured.chosen_tools([], "required")
    assert caught.value.code == "invalid_tool_choice"
    assert structured.chosen_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}) == (
        [TIME],
        "required",
    )
    assert structured.chosen_tools([WEATHER], "none") == ([], "none")
    assert structured.chosen_tools([WEATHER], None) == ([WEATHER], "auto")


def test_every_mode_builds_a_grammar_and_plain_text_builds_none():
    assert grammar_for(None, [], "none") is None and grammar_for({"type": "text"}, [], "none") is None
    for mode in ("auto", "required"):
        assert grammar_for(None, [WEATHER, TIME], mode)
        assert grammar_for(PERSON_FORMAT, [WEATHER], mode)
    assert grammar_for({"type": "json_object"}, [], "none")


def test_requests_with_tools_are_checked_as_openai_checks_them():
    ask = {"model": "m", "messages": ASK_WEATHER}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    for fields, fault in [
        ({"tools": [{"type": "function", "function": {"name": "get.weather"}}]}, "tools.0.function.name"),
        ({"messages": [{"role": "tool", "content": "18 C"}]}, "tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [call]}]}, '"assistant" messages'),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
        ({"n": 9}, "n"),
    ]:
        with pytest.raises(InvalidRequest) as caught:
            parse(ChatCompletionRequest, dict(ask, **fields)).worker_request()
        assert caught.value.status == 400 and fault in caught.value.message, caught.value.message
    # null is "not given", as OpenAI clients may send it; tools travel only when they may be called.
    request = parse(ChatCompletionRequest, dict(ask, n=None, logprobs=None, tools=[WEATHER], tool_choice="none"))
    assert request.n == 1 and "tools" not in request.worker_request() and "grammar" not in request.worker_request()
    sent = parse(ChatCompletionRequest, dict(ask, tools=[WEATHER], logprobs=True, top_logprobs=2)).worker_request()
    assert sent["tools"] == [WEATHER] and sent["logprobs"] == 2 and "<tool_call>" in sent["grammar"]
    assert "grammar" not in parse(ChatCompletionRequest, ask).worker_request()


def test_legacy_logprobs_offsets_go_on_from_the_previous_chunk():
    entries = [{"token": "Hel", "logprob": -0.5, "top_logprobs": [{"token": "Hel", "logprob": -0.5}]}]
    entries.append({"token": "lo", "logprob": -0.1, "top_logprobs": []})
    shaped = legacy_logprobs(entries, start=7)
    assert shaped["tokens"] == ["Hel", "lo"] and shaped["text_offset"] == [7, 10]
    assert shaped["top_logprobs"] == [{"Hel": -0.5}, {}] and shaped["token_logprobs"] == [-0.5, -0.1]


def test_strict_closes_objects_that_leave_extra_keys_open():
    closed = structured.closed({"type": "object", "properties": {"a": {"type": "object", "properties": {}}}})
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    kept = structured.closed({"type": "object", "properties": {}, "additionalProperties": True})
    assert kept["additionalProperties"] is True


def test_calls_are_read_from_whole_replies():
    text = render_call("get_weather", {"city": "Paris", "unit": "celsius"}) + render_call("get_time", {"zone": "CET"})
    content, calls = parse_calls(text, [WEATHER, TIME])
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    # Text around a call is content; a block naming no tool stays text; Llama-3.1-style bare JSON is a call.
    content, calls = parse_calls("Let me check.\n" + render_call("get_time", {"zone": "UTC"}), [TIME])
    assert content == "Let me check." and len(calls) == 1
    content, calls = parse_calls('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', [TIME])
    assert calls == [] and "rm_rf" in content
    content, calls = parse_calls('{"name": "get_time", "parameters": {"zone": "UTC"}}', [TIME])
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC"}
    assert parse_calls('{"answer": 42}', [TIME]) == ('{"answer": 42}', [])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11])
def test_the_stream_splitter_holds_back_only_what_may_open_a_call(size):
    text = "Sure, one moment. " + render_call("get_time", {"zone": "UTC"}) + render_call("get_time", {"zone": "CET"})
    splitter = CallSplitter([TIME])
    shown, calls = [], []
    for start in range(0, len(text), size):
        content, closed = splitter.feed(text[start : start + size])
        shown.append(content)
        calls += closed
    content, closed = splitter.finish()
    shown.append(content)
    calls += closed
    assert "".join(shown) == "Sure, one moment."  # the space before a call is not content, as in whole replies
    assert [json.loads(c["function"]["arguments"])["zone"] for c in calls] == ["UTC", "CET"]
    # "<" that never becomes a call is shown, at the latest when the text ends.
    splitter = CallSplitter([TIME])
    assert splitter.feed("a <to")[0] == "a"
    assert splitter.feed("ast> c <tool")[0] == " <toast> c"
    assert splitter.finish()[0] == " <tool"


def test_the_stream_splitter_gives_back_what_was_not_a_call():
    # A block naming no tool is text again; an argument holding "<" is no call opening; a cut call still counts.
    splitter = CallSplitter([TIME])
    content, calls = splitter.feed('<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_')
    assert (content, calls) == ("", [])
    content, calls = splitter.feed("call> then ")
    assert calls == [] and content == '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call> then'
    content, calls = splitter.feed('<tool_call>\n{"name": "get_time", "arguments": {"zone": "<UTC>"}}')
    assert (content, calls) == ("", [])
    content, calls = splitter.finish()  # max_tokens cut it before </tool_call>: the JSON is whole, so it is a call
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"zone": "<UTC>"}
    splitter = CallSplitter([TIME])
    assert splitter.feed('<tool_call>\n{"name": "get_time", "argu') == ("", [])
    assert splitter.finish() == ('<tool_call>\n{"name": "get_time", "argu', [])


def test_templates_that_ignore_tools_get_them_as_text():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    history = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    plain = template_messages(history, [TIME], tools_supported=False)
    assert plain[0]["role"] == "system" and "get_time" in plain[0]["content"] and "<tool_call>" in plain[0]["content"]
    assert plain[2] == {"role": "assistant", "content": render_call("get_time", {"zone": "UTC"}).rstrip("\n")}
    assert plain[3] == {"role": "user", "content": "get_time returned: 12:00"}
    native = template_messages(history, [TIME], tools_supported=True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}  # HF templates take objects


# --- through a real host ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Iterator[RunningHost]:
    running = start_host(tmp_path_factory.mktemp("structured"))
    yield running
    running.stop()


@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def served(request, host) -> tuple[openai.OpenAI, str]:
    """(an openai client on the host, the model's name): SmolLM2 by llama.cpp, then by transformers."""
    if request.param == "transformers":
        pytest.importorskip("transformers")
    name = f"smollm2-{request.param}"
    client = host.client()
    client.load("smollm2", name=name, backend=request.param, options={"n_ctx": 2048}, keep_alive=-1)
    yield openai.OpenAI(base_url=host.url + "/v1", api_key=host.key, max_retries=0, timeout=120), name
    client.unload(name)


def test_twenty_nested_schema_replies_all_validate(served):
    oa, model = served
    prompts = ["Describe a person.", "Invent a customer record.", "Who lives at this address?", "A club member."]
    for index in range(20):
        reply = oa.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompts[index % len(prompts)]}],
            response_format=PERSON_FORMAT,
            temperature=0.9,
            seed=index,
            max_tokens=200,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_mode_gives_an_object(served):
    oa, model = served
    reply = oa.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "A name and a city, as JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=120,
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_are_valid_and_a_second_turn_answers_in_text(served, choice):
    oa, model = served
    reply = oa.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice=choice, temperature=0, max_tokens=80
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls
    call = message.tool_calls[0]
    tool = WEATHER if call.function.name == "get_weather" else TIME
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "cloudy", "degrees": 18})},
    ]
    second = oa.chat.completions.create(
        model=model, messages=history, tools=[WEATHER, TIME], tool_choice="none", temperature=0, max_tokens=60
    )
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_a_streamed_call_reassembles_to_the_whole_one(served):
    oa, model = served
    ask = {"model": model, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "required"}
    whole = oa.chat.completions.create(**ask, temperature=0, max_tokens=80).choices[0].message.tool_calls[0]
    with oa.chat.completions.stream(**ask, temperature=0, max_tokens=80) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert (streamed.function.name, streamed.function.arguments) == (whole.function.name, whole.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"


def test_logprobs_come_from_the_model_and_greedy_picks_the_top_one(served):
    oa, model = served
    ask = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    reply = oa.chat.completions.create(**ask, temperature=0, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    # Streamed, and on /v1/completions in the legacy shape.
    stream = oa.chat.completions.create(**ask, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    # (Not compared with the whole reply: llama.cpp reuses the cached prompt, and a near tie may go the other way.)
    text, streamed = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            streamed += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
    assert streamed and "".join(e.token for e in streamed) == text
    assert all(e.token == e.top_logprobs[0].token for e in streamed)
    legacy = oa.completions.create(
        model=model, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2
    )
    logprobs = legacy.choices[0].logprobs
    assert "".join(logprobs.tokens) == legacy.choices[0].text and len(logprobs.top_logprobs[0]) == 2
    assert logprobs.text_offset[0] == 0
    # Streamed, text_offset counts on from chunk to chunk.
    tokens, offsets = [], []
    for chunk in oa.completions.create(
        model=model, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_n_choices_whole_and_streamed(served):
    oa, model = served
    ask = {"model": model, "messages": [{"role": "user", "content": "Say a word."}], "max_tokens": 6, "n": 2}
    reply = oa.chat.completions.create(**ask, temperature=0.9, seed=7)
    assert [c.index for c in reply.choices] == [0, 1] and all(c.message.content for c in reply.choices)
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    texts: dict[int, str] = {}
    stream = oa.chat.completions.create(**ask, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(texts) == [0, 1] and texts[0] == texts[1]  # greedy: both choices alike


def test_bad_structured_requests_are_400s_and_the_host_serves_on(served):
    oa, model = served
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    unknown = {"type": "function", "function": {"name": "nope"}}
    for fields, code in [
        ({"response_format": bad_schema}, "invalid_schema"),
        ({"tools": [bad_tool]}, "invalid_schema"),
        ({"tools": [WEATHER], "tool_choice": unknown}, "invalid_tool_choice"),
        ({"tools": [], "tool_choice": "required"}, "invalid_tool_choice"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            oa.chat.completions.create(model=model, messages=ASK_WEATHER, max_tokens=4, **fields)
        assert caught.value.code == code, caught.value.message
    assert oa.chat.completions.create(model=model, messages=ASK_WEATHER, max_tokens=4).choices[0].message.content
