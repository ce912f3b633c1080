"""Settings read from ``LLM_NB_*`` environment variables, with defaults.

One place for every knob, so the host, the client, the CLI and the Jupyter
server extension agree on names and units.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidRequest

DEFAULT_MODEL = "smollm2"
DEFAULT_KEEP_ALIVE_S = 300.0

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(text: str | int | float) -> int:
    """Parse ``"6GiB"``, ``"512 MB"`` or a plain byte count into bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise InvalidRequest(f"cannot read {text!r} as a memory size; write it like '6GiB', '512MB' or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_bytes(n: int | float | None) -> str:
    """``1536 -> '1.5 KiB'``: binary units, as memory is sold."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def parse_duration(text: str | int | float | None) -> float | None:
    """Seconds from ``300``, ``"5m"``, ``"1h"`` or ``"-1"`` (forever: returns -1)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        if not math.isfinite(text):  # NaN would compare false with everything, and reach clients as non-JSON
            raise InvalidRequest(f"a duration must be a finite number of seconds (-1: forever), not {text}")
        return float(text)
    match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*(ms|s|m|h|)\s*", str(text))
    if not match:
        raise InvalidRequest(f"cannot read {text!r} as a duration; write it like '300', '5m' or '-1'")
    value = float(match.group(1))
    if value < 0:
        return -1.0
    return value * {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"LLM_NB_{name}")
    return value if value not in (None, "") else default


@dataclass
class Settings:
    """Host settings. ``Settings.from_env()`` reads ``LLM_NB_*``."""

    connection_file: Path | None = None
    port: int = 0
    memory_budget: int | None = None  # bytes; None: 90 % of GPU memory, else 50 % of RAM
    keep_alive: float = DEFAULT_KEEP_ALIVE_S
    max_queue: int = 64
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout: float = 600.0
    load_timeout: float = 600.0
    worker_grace: float = 5.0
    lease_check_interval: float = 2.0
    catalog_file: Path | None = None
    #: A request (/v1, /v2) that names a catalog model nobody loaded loads it, as Ollama does.
    load_on_request: bool = True
    #: A deploy's file copies: at most this many bytes in all (``LLM_NB_MAX_DOWNLOAD``), so an
    #: endless source (``/dev/zero``, a runaway server) fails instead of filling the disk.
    max_download: int = 200 * 1024**3
    #: Seconds a copy may go without a byte before it fails (``LLM_NB_COPY_STALL``; 0 or -1: never).
    copy_stall: float = 60.0
    #: Free bytes a copy leaves on the disk it writes to (``LLM_NB_MIN_FREE_DISK``).
    min_free_disk: int = 1024**3
    #: Seconds a connection may sit without a whole request (idle between requests, or sending
    #: its headers a line at a time) before it is closed (``LLM_NB_IDLE_TIMEOUT``).
    idle_timeout: float = 20.0  # longer than aiohttp clients keep an idle connection (15 s): they close first
    #: Seconds a request body may go without a byte before the request fails (``LLM_NB_BODY_TIMEOUT``).
    body_timeout: float = 30.0
    #: Requests one client address may have open at once; more are a 503 (``LLM_NB_MAX_CONNECTIONS``).
    #: Every local client shares 127.0.0.1, so this is sized for a busy machine, not one notebook.
    max_connections: int = 256
    #: The Ray cluster for ``engine="ray"`` deployments (``LLM_NB_RAY_ADDRESS``, else ``RAY_ADDRESS``);
    #: None: the host starts a local head of its own on first use.
    ray_address: str | None = None
    #: The local head's share of this machine: logical CPUs (None: every core) and object store bytes.
    ray_num_cpus: int | None = None
    ray_object_store: int = 256 * 1024**2
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        budget = _env("MEMORY_BUDGET")
        return cls(
            connection_file=connection_setting(),
            port=int(_env("PORT", "0")),
            memory_budget=parse_size(budget) if budget else None,
            keep_alive=parse_duration(_env("KEEP_ALIVE", str(DEFAULT_KEEP_ALIVE_S))),
            max_queue=int(_env("MAX_QUEUE", "64")),
            max_body_bytes=parse_size(_env("MAX_BODY", str(8 * 1024 * 1024))),
            worker_grace=float(_env("WORKER_GRACE", "5")),
            catalog_file=user_catalog_file(),
            idle_timeout=parse_duration(_env("IDLE_TIMEOUT", "20")),
            body_timeout=parse_duration(_env("BODY_TIMEOUT", "30")),
            max_connections=int(_env("MAX_CONNECTIONS", "256")),
            load_on_request=_env("LOAD_ON_REQUEST", "1").strip().lower() not in ("0", "false", "no", "off"),
            max_download=parse_size(_env("MAX_DOWNLOAD", "200GiB")),
            copy_stall=parse_duration(_env("COPY_STALL", "60")),
            min_free_disk=parse_size(_env("MIN_FREE_DISK", "1GiB")),
            ray_address=_env("RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or None,
            ray_num_cpus=int(_env("RAY_NUM_CPUS")) if _env("RAY_NUM_CPUS") else None,
            ray_object_store=parse_size(_env("RAY_OBJECT_STORE", "256MiB")),
        )


#: Sent by llm-nb's own clients, which load with a lease and must hear that a model is gone
#: (force-unloaded, lost with a host): their requests never load a model on first use.
LOAD_ON_REQUEST_HEADER = "X-LLM-NB-Load-On-Request"


# --- streams to the host: heartbeats and the read timeout that relies on them ------------------
DEFAULT_HEARTBEAT_S = 3.0


def heartbeat_interval() -> float:
    """Seconds between the host's heartbeats on a stream that has nothing else to send (``LLM_NB_HEARTBEAT``)."""
    return max(0.2, float(_env("HEARTBEAT", str(DEFAULT_HEARTBEAT_S))))


def stream_read_timeout() -> float:
    """How long a reader waits for a byte before calling the host silent: a little over the heartbeat."""
    interval = heartbeat_interval()
    return max(3 * interval, interval + 5.0)


# --- settings of one part each ---------------------------------------------------------------
def user_catalog_file() -> Path | None:
    """The user's model catalog as ``LLM_NB_CATALOG`` names it (None: ``catalog.json`` in the user config dir)."""
    value = _env("CATALOG")
    return Path(value).expanduser() if value else None


def vllm_setting() -> Path | None:
    """The vLLM that ``--backend vllm`` runs (``LLM_NB_VLLM``): a ``vllm`` executable, or the python of a venv that has it."""
    value = _env("VLLM")
    return Path(value).expanduser() if value else None


def worker_stream_interval() -> float:
    """Seconds a worker lets tokens gather between two writes of a stream (``LLM_NB_STREAM_INTERVAL``)."""
    return float(_env("STREAM_INTERVAL", "0.05"))


def host_log_level() -> str:
    """The host's log level, unless ``--log-level`` says otherwise (``LLM_NB_LOG_LEVEL``)."""
    return _env("LOG_LEVEL", "INFO")


def setting_text(name: str, default: str = "") -> str:
    """``LLM_NB_<name>`` as it is written (``default`` when unset or empty), for a front end that parses it itself.

    The Jupyter server extension takes its traits' defaults from here, so that a typo is
    reported against the trait's name (``LlmNbExtension.memory_budget``) when it is checked.
    """
    return _env(name, default) or default


def connection_setting() -> Path | None:
    """The connection file ``LLM_NB_CONNECTION`` names (set by the Jupyter server extension for its kernels)."""
    value = _env("CONNECTION")
    return Path(value).expanduser() if value else None


def client_name() -> str | None:
    """How leases taken by this process are named in status and the panels (``LLM_NB_CLIENT_NAME``)."""
    return _env("CLIENT_NAME")
