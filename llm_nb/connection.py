"""The connection file: how clients find the one host of a Jupyter server.

JSON with ``url``, ``key``, ``pid``, ``version``, ``started`` and
``runtime_dir``, written atomically with mode 0600. Both sides use this
module, so it stays free of host and backend imports.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import psutil
import requests

from .config import connection_setting

CONNECTION_ENV = "LLM_NB_CONNECTION"
DEFAULT_FILE_NAME = "llm-nb-host.json"


def runtime_dir() -> Path:
    """Jupyter's runtime dir (``JUPYTER_RUNTIME_DIR`` honoured), created 0700."""
    from jupyter_core.paths import jupyter_runtime_dir

    path = Path(jupyter_runtime_dir())
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def connection_path(explicit: str | os.PathLike | None = None) -> Path:
    """The file in use: an explicit path, else ``$LLM_NB_CONNECTION``, else the per-user default."""
    if explicit:
        return Path(explicit).expanduser()
    return connection_setting() or runtime_dir() / DEFAULT_FILE_NAME


def write_connection(path: Path, info: dict) -> None:
    """Write atomically (tmp file + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".llm-nb-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_connection(path: Path) -> dict | None:
    """The file's content, or None if it is missing or unreadable."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "url" in info and "key" in info else None


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """True if ``pid`` runs and, when ``started`` is given, is the same process (no pid reuse)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def remove_if_ours(path: Path, pid: int) -> None:
    """Remove the connection file only if it still names this process."""
    info = read_connection(path)
    if info is not None and info.get("pid") == pid:
        path.unlink(missing_ok=True)


def live_host(path: Path, timeout: float = 2.0) -> dict | None:
    """The host a connection file names, if its process runs and it answers ``/health``."""
    info = read_connection(path)
    if not info or not pid_alive(info.get("pid")):
        return None
    try:
        requests.get(info["url"] + "/health", timeout=timeout).raise_for_status()
    except requests.RequestException:
        return None
    return info
