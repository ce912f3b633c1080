"""Streaming throughput: llm-nb host (+ worker) vs llama-cpp-python in-process vs its own server.

Side by side in one run, same GGUF, greedy, same threads and context, the
same chat prompt and max_tokens. Each engine is measured in turn (never at
the same time: the machine has 2 cores) for several rounds, and medians are
reported. Usage:

    python benchmarks/bench_host.py [--rounds 5] [--max-tokens 128] [--threads 2]

Prints decode tokens/s (tokens after the first over the time after the
first), time to first token, and the ratios host/in-process and host/server.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _host import running_host  # noqa: E402

from llm_nb.catalog import smollm2_path  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_stream(chunks) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, tokens) from an iterator of text pieces with token counts."""
    start = time.perf_counter()
    first = None
    tokens = 0
    for count in chunks:
        if count and first is None:
            first = time.perf_counter()
        tokens += count
    end = time.perf_counter()
    ttft = (first or end) - start
    rate = (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0
    return ttft, rate, tokens


def openai_chunks(client: openai.OpenAI, model: str, max_tokens: int):
    """Yield 1 per streamed token; the host may coalesce tokens, so usage settles the count."""
    stream = client.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            yield 1
        if chunk.usage:
            yield max(0, chunk.usage.completion_tokens - seen)


def run_inprocess(path: str, threads: int, n_ctx: int, max_tokens: int, rounds: int) -> list[tuple]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, verbose=False)

    def chunks():
        for chunk in llm.create_chat_completion(messages=PROMPT, max_tokens=max_tokens, temperature=0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                yield 1

    results = []
    for _ in range(rounds + 1):  # like the servers, later rounds reuse the cached prompt
        results.append(timed_stream(chunks()))
    llm.close()
    return results[1:]  # the first round warms caches


def run_server(path: str, threads: int, n_ctx: int, max_tokens: int, rounds: int) -> list[tuple]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(threads),
            "--model_alias",
            "smollm2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        results = [timed_stream(openai_chunks(client, "smollm2", max_tokens)) for _ in range(rounds + 1)]
    finally:
        proc.terminate()
        proc.wait(20)
    return results[1:]


def run_host(path: str, threads: int, n_ctx: int, max_tokens: int, rounds: int) -> list[tuple]:
    from llm_nb.client import Client

    with tempfile.TemporaryDirectory() as tmp, running_host(Path(tmp)) as (_, conn):
        llm_nb = Client(conn, autostart=False)
        llm_nb.load(path, name="smollm2", options={"n_ctx": n_ctx, "n_threads": threads})
        info = llm_nb.host_info()
        client = openai.OpenAI(base_url=info["url"] + "/v1", api_key=info["key"], max_retries=0)
        results = [timed_stream(openai_chunks(client, "smollm2", max_tokens)) for _ in range(rounds + 1)]
    return results[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--model", default=smollm2_path())
    args = parser.parse_args()

    runs = {}
    # Interleave engines round by round so that drift in machine load hits all alike.
    for engine, fn in (("in-process", run_inprocess), ("llama_cpp.server", run_server), ("llm-nb host", run_host)):
        runs[engine] = fn(args.model, args.threads, args.n_ctx, args.max_tokens, args.rounds)

    print(
        f"model {Path(args.model).name}, greedy, {args.max_tokens} new tokens, {args.threads} threads, n_ctx {args.n_ctx}, "
        f"{args.rounds} rounds (medians)"
    )
    print(f"{'engine':<18} {'decode tok/s':>12} {'TTFT ms':>9} {'tokens':>7}")
    medians = {}
    for engine, results in runs.items():
        ttft = statistics.median(r[0] for r in results)
        rate = statistics.median(r[1] for r in results)
        tokens = statistics.median(r[2] for r in results)
        medians[engine] = rate
        print(f"{engine:<18} {rate:>12.1f} {ttft * 1000:>9.1f} {tokens:>7.0f}")
    host = medians["llm-nb host"]
    print(f"host / in-process      = {host / medians['in-process']:.3f}  (aim >= 0.95)")
    print(f"host / llama_cpp.server = {host / medians['llama_cpp.server']:.3f}  (aim >= 1.0)")


if __name__ == "__main__":
    main()
