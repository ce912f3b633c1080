"""What the host process itself costs, before and after its first load (the model lives in a worker).

Starts a host the way a kernel does (``llm_nb.client.Client``, which runs it
under the launcher), reads the host's and the launcher's RSS and USS with
psutil when idle, after loading the default model, after a chat, and after
unloading it; the worker's RSS is shown beside it for scale. Usage:

    python benchmarks/host_memory.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_nb.client import Client  # noqa: E402


def mib(n: int) -> str:
    return f"{n / 2**20:7.1f} MiB"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = tmp
        os.environ["LLM_NB_CONNECTION"] = str(Path(tmp) / "host.json")
        client = Client(on_notice=lambda _: None)
        host = psutil.Process(client.host_info()["pid"])
        launcher = host.parent()
        rows = []

        def measure(stage: str) -> None:
            time.sleep(1.0)  # let allocations settle
            workers = [c for c in host.children() if "llm_nb.worker" in " ".join(c.cmdline())]
            full = host.memory_full_info()
            rows.append(
                (
                    stage,
                    full.rss,
                    full.uss,
                    launcher.memory_info().rss,
                    sum(w.memory_info().rss for w in workers),
                )
            )

        measure("idle")
        client.load("smollm2", keep_alive=0)
        measure("after the first load")
        client.chat("Say hi.", "smollm2", max_tokens=8)
        measure("after a chat")
        client.unload("smollm2")
        measure("after unload")
        client.shutdown()
    print(f"{'stage':<22} {'host RSS':>11} {'host USS':>11} {'launcher RSS':>13} {'worker RSS':>11}")
    for stage, rss, uss, launcher_rss, worker_rss in rows:
        print(f"{stage:<22} {mib(rss):>11} {mib(uss):>11} {mib(launcher_rss):>13} {mib(worker_rss):>11}")
    grown = rows[1][1] - rows[0][1]
    print(
        f"the first load grows the host by {mib(grown).strip()} of RSS ({mib(rows[-1][1] - rows[0][1]).strip()} stays after unload)"
    )


if __name__ == "__main__":
    main()
