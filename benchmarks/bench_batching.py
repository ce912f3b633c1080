"""Batching: 8 concurrent chat requests against the same 8 one after another, in one run.

One host, SmolLM2-135M-Instruct loaded from its GGUF through the transformers
backend (CPU, float32 unless --dtype), greedy, the same 8 prompts and
max_tokens both ways. Each round runs the 8 requests one at a time, then all 8
at once (the order flips every round so drift in machine load hits both
alike). Usage:

    python benchmarks/bench_batching.py [--rounds 3] [--requests 8] [--max-tokens 64] [--dtype float32]

Prints, as medians over rounds: total completion tokens/s each way and their
ratio (aim >= 3x), and time to first token: per request when it runs alone,
and under load (every request sent at once; median and worst of the 8). It
also checks that each greedy reply is the same both ways.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _host import running_host  # noqa: E402
from prompts import PROMPTS  # noqa: E402  (shared with gpu_check, which must not need openai)

from llm_nb.catalog import smollm2_path  # noqa: E402


def one_request(client: openai.OpenAI, prompt: str, max_tokens: int, sent: float) -> dict:
    """Stream one greedy chat; time to first token from ``sent``, text and completion tokens."""
    stream = client.chat.completions.create(
        model="smollm2-hf",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = None
    parts = []
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft": (first or end) - sent, "text": "".join(parts), "tokens": tokens, "end": end}


def sequential(client: openai.OpenAI, prompts: list[str], max_tokens: int) -> dict:
    start = time.perf_counter()
    results = []
    for prompt in prompts:
        results.append(one_request(client, prompt, max_tokens, time.perf_counter()))
    wall = time.perf_counter() - start
    return {"wall": wall, "results": results}


def concurrent(client: openai.OpenAI, prompts: list[str], max_tokens: int) -> dict:
    barrier = threading.Barrier(len(prompts) + 1)
    start_box: list[float] = []

    def run(prompt: str) -> dict:
        barrier.wait()
        return one_request(client, prompt, max_tokens, start_box[0])

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(run, p) for p in prompts]
        start_box.append(time.perf_counter())
        barrier.wait()
        results = [f.result() for f in futures]
    wall = max(r["end"] for r in results) - start_box[0]
    return {"wall": wall, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, help="torch threads (default: the backend's)")
    parser.add_argument("--model", default=smollm2_path())
    args = parser.parse_args()
    prompts = (PROMPTS * (args.requests // len(PROMPTS) + 1))[: args.requests]

    from llm_nb.client import Client

    with tempfile.TemporaryDirectory() as tmp, running_host(Path(tmp)) as (_, conn):
        llm_nb = Client(conn, autostart=False)
        options = {"dtype": args.dtype, "n_ctx": 2048, "max_batch": args.requests}
        if args.threads:
            options["n_threads"] = args.threads
        loaded = llm_nb.load(args.model, name="smollm2-hf", backend="transformers", options=options)
        info = loaded["model"]["info"]
        info_url = llm_nb.host_info()
        client = openai.OpenAI(base_url=info_url["url"] + "/v1", api_key=info_url["key"], max_retries=0)
        one_request(client, prompts[0], 8, time.perf_counter())  # warm up: first-call allocations
        rounds = []
        for index in range(args.rounds):
            order = (sequential, concurrent) if index % 2 == 0 else (concurrent, sequential)
            done = {fn.__name__: fn(client, prompts, args.max_tokens) for fn in order}
            rounds.append(done)
            seq, con = done["sequential"], done["concurrent"]
            print(
                f"round {index + 1}: one at a time {sum(r['tokens'] for r in seq['results'])} tokens in "
                f"{seq['wall']:.1f} s, all at once {sum(r['tokens'] for r in con['results'])} tokens in "
                f"{con['wall']:.1f} s",
                flush=True,
            )

    def rate(run: dict) -> float:
        return sum(r["tokens"] for r in run["results"]) / run["wall"]

    seq_rate = statistics.median(rate(r["sequential"]) for r in rounds)
    con_rate = statistics.median(rate(r["concurrent"]) for r in rounds)
    alone_ttft = statistics.median(x["ttft"] for r in rounds for x in r["sequential"]["results"])
    load_ttft = statistics.median(statistics.median(x["ttft"] for x in r["concurrent"]["results"]) for r in rounds)
    worst_ttft = statistics.median(max(x["ttft"] for x in r["concurrent"]["results"]) for r in rounds)
    same = all(
        a["text"] == b["text"]
        for r in rounds
        for a, b in zip(r["sequential"]["results"], r["concurrent"]["results"], strict=True)
    )
    print(
        f"\nmodel {Path(args.model).name} via transformers on {info['device']}, {info['dtype']}, "
        f"{info['n_threads']} torch threads, greedy, {args.requests} requests x {args.max_tokens} max tokens, "
        f"{args.rounds} rounds (medians)"
    )
    print(f"{'':<22} {'tokens/s':>9} {'TTFT ms':>9} {'worst TTFT ms':>14}")
    print(f"{'one at a time':<22} {seq_rate:>9.1f} {alone_ttft * 1000:>9.0f} {'':>14}")
    print(f"{f'{args.requests} at once':<22} {con_rate:>9.1f} {load_ttft * 1000:>9.0f} {worst_ttft * 1000:>14.0f}")
    print(f"throughput ratio (at once / one at a time) = {con_rate / seq_rate:.2f}x  (aim >= 3x)")
    print(f"greedy replies identical both ways: {same}")


if __name__ == "__main__":
    main()
