"""One shared host for a JupyterHub against one host per user's server, side by side in one run.

For N users (2, 4, 8 by default), on a real JupyterHub on loopback (the test suite's
``tests/hub_servers.py``: DummyAuthenticator, SimpleLocalProcessSpawner, llm-nb as
the Hub's service), each user starts their server, opens a kernel and runs
``%llm_load smollm2`` and one ``%%llm_chat``:

1. hub service: every kernel uses the Hub's shared host (``LLM_NB_HUB_URL``);
2. per server: the same Hub with ``LLM_NB_HUB=0`` in the users' servers, so each
   server's extension starts a host of its own (today's mode without a Hub).

Memory is what the hosts and their model workers hold (the users' servers and
kernels are the same in both modes and left out): RSS, and PSS (shared pages split
among the processes that map them: llama.cpp mmaps the GGUF, so on a CPU the page
cache shares the weights of the per-server copies; the KV cache and buffers stay
private. On a GPU every copy is private, like the RSS column).

Then the fairness figure of the hub service: one user keeps 16 streaming chats in
flight; the median time to first token of another user's chat, idle and beside
them, and of a 17th chat of the busy user (which waits behind her own queue: what
every request would get first come, first served). Usage:

    python benchmarks/bench_hub.py [--users 2 4 8] [--samples 9] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_nb.config import format_bytes  # noqa: E402
from tests.hub_servers import RemoteKernel, RunningHub, first_token_s, keep_in_flight, start_hub  # noqa: E402

MODEL = "smollm2"


def model_processes(hub: RunningHub, per_server: bool) -> list[psutil.Process]:
    """The llm-nb hosts and their model workers: the Hub's shared one, or those the users' servers started."""
    if per_server:
        tree = psutil.Process(hub.process.pid).children(recursive=True)  # servers, kernels, their hosts
    else:
        shared = psutil.Process(hub.host_info()["pid"])
        tree = [shared, *shared.children(recursive=True)]
    found = []
    for proc in tree:
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "llm_nb.host" in cmdline or "llm_nb.worker" in cmdline:
            found.append(proc)
    return found


def memory(processes: list[psutil.Process]) -> tuple[int, int]:
    rss = pss = 0
    for proc in processes:
        try:
            full = proc.memory_full_info()
        except psutil.Error:
            continue
        rss += full.rss
        pss += getattr(full, "pss", full.rss)
    return rss, pss


def run_users(hub: RunningHub, n: int, prefix: str) -> list[RemoteKernel]:
    kernels = []
    for i in range(n):
        name = f"{prefix}{i}"
        token = hub.add_user(name)
        url = hub.start_server(name, token)
        kernel = RemoteKernel(url, token, notebook=f"{name}.ipynb")
        reply, out = kernel.run(f"%load_ext llm_nb\n%llm_load {MODEL}")
        if reply["status"] != "ok" or "error" in out.lower():
            raise RuntimeError(f"{name}: {out}")
        reply, out = kernel.run("%%llm_chat --max-tokens 16\nName a colour.")
        kernels.append(kernel)
    return kernels


def settle_memory(hub: RunningHub, per_server: bool) -> tuple[int, int, int]:
    time.sleep(2)
    processes = model_processes(hub, per_server)
    workers = sum(1 for p in processes if "llm_nb.worker" in " ".join(p.cmdline()))
    rss, pss = memory(processes)
    return rss, pss, workers


def fairness(hub: RunningHub, samples: int, max_tokens: int) -> dict:
    busy_user, other = hub.add_user("fair-busy"), hub.add_user("fair-other")
    url = hub.service_url
    requests.post(
        url + "/api/models/load", headers={"Authorization": f"Bearer {other}"}, json={"model": MODEL}, timeout=300
    ).raise_for_status()
    idle = statistics.median(first_token_s(url, other, MODEL) for _ in range(samples))
    stop = threading.Event()

    threads = keep_in_flight(url, busy_user, MODEL, 16, stop, max_tokens)
    time.sleep(3)
    beside, own = [], []
    for _ in range(samples):
        beside.append(first_token_s(url, other, MODEL))
        own.append(first_token_s(url, busy_user, MODEL))
    stop.set()
    for thread in threads:
        thread.join(120)
    return {"idle": idle, "beside": statistics.median(beside), "own": statistics.median(own)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--samples", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=24, help="of each of the busy user's 16 requests")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    rows = []
    fair = None
    try:
        for n in args.users:
            results = {}
            for mode, env in (("hub service", {}), ("per server", {"LLM_NB_HUB": "0"})):
                hub = start_hub(folder / f"{n}-{mode.replace(' ', '-')}", user_env=env)
                kernels: list[RemoteKernel] = []
                try:
                    kernels = run_users(hub, n, prefix="u")
                    results[mode] = settle_memory(hub, per_server=bool(env))
                    if mode == "hub service" and fair is None and n == max(args.users):
                        fair = fairness(hub, args.samples, args.max_tokens)
                finally:
                    for kernel in kernels:
                        try:
                            kernel.close()
                        except Exception:
                            pass
                    hub.stop()
            rows.append((n, results))
            shared, separate = results["hub service"], results["per server"]
            print(
                f"{n} users: hub service {format_bytes(shared[0])} RSS / {format_bytes(shared[1])} PSS in "
                f"{shared[2]} worker(s); per server {format_bytes(separate[0])} RSS / {format_bytes(separate[1])} PSS "
                f"in {separate[2]} worker(s): {separate[0] / shared[0]:.1f}x RSS, {separate[1] / shared[1]:.1f}x PSS",
                flush=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print()
    print("| users | hub service RSS | per server RSS | ratio | hub service PSS | per server PSS | ratio | workers |")
    print("|---|---|---|---|---|---|---|---|")
    for n, results in rows:
        (hr, hp, hw), (sr, sp, sw) = results["hub service"], results["per server"]
        print(
            f"| {n} | {format_bytes(hr)} | {format_bytes(sr)} | {sr / hr:.1f}x | {format_bytes(hp)} | "
            f"{format_bytes(sp)} | {sp / hp:.1f}x | {hw} vs {sw} |"
        )
    if fair:
        print()
        print(
            f"fairness (hub service, {max(args.users)} users' servers up; medians of {args.samples}): another user's "
            f"first token {fair['idle'] * 1000:.0f} ms idle, {fair['beside'] * 1000:.0f} ms beside one user's 16 in "
            f"flight ({fair['beside'] / fair['idle']:.1f}x); that busy user's own 17th request "
            f"{fair['own'] * 1000:.0f} ms ({fair['own'] / fair['idle']:.1f}x, first come first served behind her queue)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
