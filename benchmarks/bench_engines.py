"""Engines side by side: llama.cpp, transformers and vLLM through the host, and vLLM's own server directly.

The same model (SmolLM2-135M-Instruct: the embedded GGUF; vLLM gets the HF folder the host
converted from it), the same prompts, greedy, ``--max-tokens`` (128) a reply, one request at a
time and ``--concurrent`` (8) at once, one run. Rounds alternate the engines' order so that drift
in the machine's load hits all alike. Usage:

    python benchmarks/bench_engines.py [--rounds 3] [--threads 1] [--engines llamacpp,transformers,vllm]

vLLM on CPU computes on one core and keeps the other for its API server and engine loop, so the
others get ``--threads`` (default 1) as well: equal compute threads. Prints the medians over rounds
of completion tokens/s, and vLLM through the host against vLLM direct (aim >= 0.95).

The direct vLLM is a second ``vllm serve`` started here with the arguments the host gave its own
(model folder, --max-model-len, --kv-cache-memory-bytes, --max-num-seqs); both idle while the
other is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _host import running_host  # noqa: E402
from prompts import PROMPTS  # noqa: E402

from llm_nb.client import Client  # noqa: E402
from llm_nb.host.vllm import free_port  # noqa: E402
from llm_nb.host.vllm_env import find_vllm  # noqa: E402


async def one_chat(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{model}: HTTP {response.status}: {answer}")
    return int(answer["usage"]["completion_tokens"])


async def tokens_per_second(url: str, key: str, model: str, prompts: list[str], max_tokens: int, at_once: bool):
    """Completion tokens/s over ``prompts``: all sent at once, or one after another."""
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=1800)
    ) as session:
        started = time.perf_counter()
        if at_once:
            counts = await asyncio.gather(*(one_chat(session, url, model, p, max_tokens) for p in prompts))
        else:
            counts = [await one_chat(session, url, model, p, max_tokens) for p in prompts]
        return sum(counts) / (time.perf_counter() - started)


@contextlib.contextmanager
def direct_vllm(info: dict, log_path: Path) -> Iterator[tuple[str, str, str]]:
    """``vllm serve`` started here with the host's arguments; (url, key, model name)."""
    port, key, name = free_port(), secrets.token_urlsafe(16), "direct"
    command = [*find_vllm(), "serve", info["model_folder"], "--host", "127.0.0.1", "--port", str(port)]
    command += ["--served-model-name", name, "--api-key", key, "--max-model-len", str(info["max_model_len"])]
    command += ["--kv-cache-memory-bytes", str(info["kv_cache_bytes"]), "--max-num-seqs", str(info["parallel"])]
    command += ["--enable-prefix-caching", "--disable-uvicorn-access-log"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_nb.keeper", "--parent-pid", str(os.getpid()), "--", *command],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        import requests

        deadline = time.monotonic() + 900
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the direct vLLM did not start; see {log_path}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}", key, name
    finally:
        process.terminate()
        process.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--engines", default="llamacpp,transformers,vllm")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "vllm" in engines and find_vllm() is None:
        print("bench_engines: vLLM is not installed (`make install-vllm`): measuring without it", flush=True)
        engines.remove("vllm")
    prompts = PROMPTS[: args.concurrent]
    options = {
        "llamacpp": {"n_threads": args.threads, "n_ctx": 2048},
        "transformers": {"n_threads": args.threads, "n_ctx": 2048},
        "vllm": {"n_ctx": 2048},
    }
    with tempfile.TemporaryDirectory() as tmp, running_host(Path(tmp)) as (info, conn):
        client = Client(conn, autostart=False)
        for engine in engines:
            started = time.monotonic()
            client.load("smollm2", backend=engine, name=f"smollm2-{engine}", options=options[engine], keep_alive=-1)
            print(f"loaded smollm2-{engine} in {time.monotonic() - started:.0f} s", flush=True)
        targets = {e: (info["url"], info["key"], f"smollm2-{e}") for e in engines}
        with contextlib.ExitStack() as stack:
            if "vllm" in engines:
                vllm_info = next(m for m in client.status()["models"] if m["name"] == "smollm2-vllm")["info"]
                targets["vllm direct"] = stack.enter_context(direct_vllm(vllm_info, Path(tmp) / "direct-vllm.log"))
            names = list(targets)
            figures: dict[tuple[str, str], list[float]] = {}
            for url, key, model in targets.values():  # warm-up: first requests compile and fill caches
                asyncio.run(tokens_per_second(url, key, model, prompts[:2], 16, at_once=True))
            for round_ in range(args.rounds):
                order = names if round_ % 2 == 0 else names[::-1]
                for name in order:
                    url, key, model = targets[name]
                    one = asyncio.run(tokens_per_second(url, key, model, prompts[:4], args.max_tokens, at_once=False))
                    many = asyncio.run(tokens_per_second(url, key, model, prompts, args.max_tokens, at_once=True))
                    figures.setdefault((name, "1"), []).append(one)
                    figures.setdefault((name, "n"), []).append(many)
                    print(
                        f"round {round_ + 1}: {name:14} 1 stream {one:7.1f} tok/s, {args.concurrent} at once {many:7.1f} tok/s",
                        flush=True,
                    )
    median = {key: statistics.median(values) for key, values in figures.items()}
    print(f"\nmedians over {args.rounds} rounds (greedy, {args.max_tokens} tokens, {args.threads} compute thread(s)):")
    print(f"{'engine':16}{'1 stream tok/s':>16}{f'{args.concurrent} at once tok/s':>20}")
    for name in names:
        print(f"{name:16}{median[(name, '1')]:16.1f}{median[(name, 'n')]:20.1f}")
    if "vllm" in engines:
        for which, label in (("1", "1 stream"), ("n", f"{args.concurrent} at once")):
            ratio = median[("vllm", which)] / median[("vllm direct", which)]
            print(f"vLLM through the host / direct, {label}: {ratio:.3f} ({'ok' if ratio >= 0.95 else 'below 0.95'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
