"""A host of the benchmarks' own, started the way the clients start one (``llm_nb.locator.spawn_host``)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_nb.locator import spawn_host  # noqa: E402


@contextlib.contextmanager
def running_host(folder: Path, **env_extra: str) -> Iterator[tuple[dict, Path]]:
    """``(connection info, connection file)`` of a new host under ``folder``; stopped on leaving.

    ``LLM_NB_CONNECTION`` is set in this process too, so that clients and kernels made here find it.
    """
    conn = Path(folder) / "rt" / "host.json"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(conn.parent), LLM_NB_CONNECTION=str(conn), **env_extra)
    info, _ = spawn_host(conn, env=env)
    os.environ["LLM_NB_CONNECTION"] = str(conn)
    try:
        yield info, conn
    finally:
        with contextlib.suppress(psutil.Error):
            host = psutil.Process(info["pid"])
            launcher = host.parent()  # it writes the exit record after the host ends: wait for it too
            host.terminate()
            try:
                host.wait(20)
            except psutil.TimeoutExpired:
                host.kill()
            if launcher is not None:
                launcher.wait(10)
