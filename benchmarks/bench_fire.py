"""consume.fire: 8 prompts at once vs the same 8 one at a time, side by side in one run.

Endpoints, each measured in turn (never at the same time: the machine has 2 cores):

- this host's /v1 (SmolLM2 in a llama.cpp worker, which runs one request at a time),
- a deployment whose model.py awaits that same SmolLM2 through use_model (achat),
- a deployment whose predict awaits 0.25 s of I/O (what overlapping can give at best),
- llama-cpp-python's own OpenAI server on the same GGUF (``--interrupt_requests False``).

Also the cost of the deployment hop: median latency of an empty predict.
Usage:

    python benchmarks/bench_fire.py [--rounds 3] [--prompts 8] [--max-tokens 16]
    python benchmarks/bench_fire.py --engines [--rounds 5]   # needs llm-nb[ray]

``--engines`` compares the deployment engines instead, on one CPU-bound model.py
(50 ms of pure-Python work a predict): a local worker, Ray Serve with 1 replica
and Ray Serve with 2 replicas, 16 payloads 4 at a time, interleaved rounds; then
the per-request cost of each hop (an empty predict, one at a time).

Prints, per endpoint, the median over rounds of: wall time at concurrency N and
one at a time, the speed-up (one-at-a-time wall / parallel wall), p50 latency
and tokens/s.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _host import running_host  # noqa: E402

from llm_nb import consume  # noqa: E402
from llm_nb.catalog import smollm2_path  # noqa: E402

TOPICS = "sea sky sun moon tree rock bird fish river cloud snow wind fire sand leaf star".split()

CHAT_MODEL_PY = """
from llm_nb.deployment import use_model

model = None

async def init(model_meta=None, *args, **kwargs):
    global model
    model = use_model("smollm2")

async def predict(payload_dict: dict, **kwargs):
    answer = await model.achat_completion(
        payload_dict["user_prompt"], max_tokens=payload_dict.get("max_tokens", 16), temperature=0
    )
    return {"answer": answer["choices"][0]["message"]["content"], "usage": answer["usage"]}
"""

SLEEP_MODEL_PY = """
import asyncio

async def predict(payload_dict: dict, **kwargs):
    await asyncio.sleep(float(payload_dict.get("sleep", 0)))
    return {"answer": payload_dict["user_prompt"]}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def write_model(folder: Path, code: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(textwrap.dedent(code))
    return folder


def summarise(runs: list[dict]) -> dict:
    def median(key: str) -> float | None:
        values = [run[key] for run in runs if run.get(key) is not None]
        return statistics.median(values) if values else None

    return {k: median(k) for k in ("wall_s", "sequential_wall_s", "speedup", "p50_s", "tokens_per_s")}


BUSY_MODEL_PY = """
import time

def predict(payload_dict: dict, **kwargs):
    start = time.perf_counter()
    while time.perf_counter() - start < float(payload_dict.get("seconds", 0.05)):
        pass
    return {"answer": payload_dict.get("user_prompt")}
"""


def engines(rounds: int) -> None:
    """Local worker vs Ray Serve (1 and 2 replicas) on the same CPU-bound model.py."""
    prompts = [f"payload {i}" for i in range(16)]
    setups = [("local worker", {}), ("ray, 1 replica", {"engine": "ray", "replicas": 1})]
    setups.append(("ray, 2 replicas", {"engine": "ray", "replicas": 2}))
    # 3 logical CPUs so that all three stay deployed (each replica reserves one); they are
    # measured one at a time, so they never share the machine's 2 real cores.
    with (
        tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp_name,
        running_host(Path(tmp_name), LLM_NB_RAY_NUM_CPUS="3") as (info, _),
    ):
        headers = {"Authorization": f"Bearer {info['key']}"}
        folder = write_model(Path(tmp_name) / "busy", BUSY_MODEL_PY)
        urls = {}
        for index, (label, options) in enumerate(setups):
            body = {"name": f"busy{index}", "folder": str(folder), **options}
            requests.post(
                info["url"] + "/api/deployments/deploy", json=body, headers=headers, timeout=600
            ).raise_for_status()
            urls[label] = f"{info['url']}/models/busy{index}/"
        fire = {"concurrency": 4, "progress": False, "compare_sequential": False, "retries": 0}
        for url in urls.values():  # warm-up
            consume.fire(url, prompts[:4], params={"seconds": 0.05}, **fire)
        runs: dict[str, list[dict]] = {label: [] for label in urls}
        hops: dict[str, list[float]] = {label: [] for label in urls}
        for _ in range(rounds):
            for label, url in urls.items():
                report = consume.fire(url, prompts, params={"seconds": 0.05}, **fire)
                if report.errors:
                    raise RuntimeError(f"{label}: {[r.error for r in report.errors][:3]}")
                runs[label].append(report.summary)
                token = consume.get_session_token(url)
                for _ in range(20):
                    started = time.perf_counter()
                    consume.predict(url, {"seconds": 0}, token)
                    hops[label].append(time.perf_counter() - started)

    print(f"16 payloads of 50 ms CPU work, 4 at a time; median of {rounds} interleaved rounds after a warm-up")
    print(f"{'engine':18} {'req/s':>7} {'vs local':>8} {'p50 ms':>7} {'p99 ms':>7} {'empty predict ms':>17}")
    base = statistics.median(r["requests_per_s"] for r in runs["local worker"])
    base_hop = statistics.median(hops["local worker"])
    for label in urls:
        rate = statistics.median(r["requests_per_s"] for r in runs[label])
        hop = statistics.median(hops[label])
        extra = "" if label == "local worker" else f" (+{(hop - base_hop) * 1000:.1f})"
        print(
            f"{label:18} {rate:7.1f} {rate / base:7.2f}x {statistics.median(r['p50_s'] for r in runs[label]) * 1000:7.0f} "
            f"{statistics.median(r['p99_s'] for r in runs[label]) * 1000:7.0f} {hop * 1000:9.1f}{extra}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, the same for both engines")
    parser.add_argument("--engines", action="store_true", help="local worker vs Ray Serve replicas instead")
    args = parser.parse_args()
    if args.engines:
        engines(args.rounds)
        return
    prompts = [f"Say one sentence about the {TOPICS[i % len(TOPICS)]}." for i in range(args.prompts)]
    concurrency = args.prompts
    gen = {"max_tokens": args.max_tokens, "temperature": 0}

    with tempfile.TemporaryDirectory(prefix="bench-fire-") as tmp_name, running_host(Path(tmp_name)) as (info, _):
        tmp = Path(tmp_name)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path(), "--host", "127.0.0.1"]
            + ["--port", str(port), "--n_ctx", "2048", "--n_threads", str(args.threads)]
            + ["--interrupt_requests", "False"],  # else a new request cuts off the running stream
            stdout=open(tmp / "server.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        try:
            headers = {"Authorization": f"Bearer {info['key']}"}
            load = {"model": "smollm2", "keep_alive": -1, "options": {"n_ctx": 2048, "n_threads": args.threads}}
            requests.post(info["url"] + "/api/models/load", json=load, headers=headers, timeout=300).raise_for_status()
            for name, code in (("chat", CHAT_MODEL_PY), ("sleep", SLEEP_MODEL_PY)):
                body = {"name": name, "folder": str(write_model(tmp / name, code))}
                requests.post(
                    info["url"] + "/api/deployments/deploy", json=body, headers=headers, timeout=300
                ).raise_for_status()
            server_url = f"http://127.0.0.1:{port}/v1"
            wait_until(lambda: requests.get(server_url + "/models", timeout=2).ok, 90, "llama_cpp.server")

            endpoints = [
                ("host /v1 (llama.cpp worker)", info["url"] + "/v1", gen),
                ("deployment -> use_model", info["url"] + "/models/chat/", {"params": {"max_tokens": args.max_tokens}}),
                ("deployment, 0.25 s of I/O", info["url"] + "/models/sleep/", {"params": {"sleep": 0.25}}),
                ("llama_cpp.server /v1", server_url, gen),
            ]
            for _, url, kwargs in endpoints:  # warm-up: first requests pay one-time costs
                consume.fire(url, prompts[:2], concurrency=2, progress=False, compare_sequential=False, **kwargs)
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in endpoints}
            # Rounds interleave the endpoints, so that each sees the same background load.
            for _ in range(args.rounds):
                for label, url, kwargs in endpoints:
                    report = consume.fire(url, prompts, concurrency=concurrency, progress=False, **kwargs)
                    failed = report.errors + [r for r in report.sequential or [] if not r.ok]
                    if failed:
                        raise RuntimeError(f"{label}: {[r.error for r in failed][:3]}")
                    runs[label].append(report.summary)

            hop = []
            token = consume.get_session_token(info["url"] + "/models/sleep/")
            for _ in range(50):
                started = time.perf_counter()
                consume.predict(info["url"] + "/models/sleep/", {"user_prompt": "x"}, token)
                hop.append(time.perf_counter() - started)
        finally:
            server.terminate()
            server.wait(30)

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(
        f"{args.prompts} prompts, concurrency {concurrency} vs 1, max_tokens {args.max_tokens}, "
        f"{args.threads} llama.cpp threads, median of {args.rounds} interleaved rounds after a warm-up"
    )
    print(f"{'endpoint':30} {'parallel s':>10} {'1-by-1 s':>9} {'speed-up':>8} {'p50 s':>7} {'tok/s':>7}")
    for label, row in ((label, summarise(r)) for label, r in runs.items()):
        print(
            f"{label:30} {fmt(row['wall_s'], '10.2f')} {fmt(row['sequential_wall_s'], '9.2f')} "
            f"{fmt(row['speedup'], '7.2f')}x {fmt(row['p50_s'], '7.2f')} {fmt(row['tokens_per_s'], '7.1f')}"
        )
    print(
        f"deployment hop: median {statistics.median(hop) * 1000:.1f} ms per empty predict (p90 "
        f"{sorted(hop)[int(len(hop) * 0.9)] * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
