"""What this machine's CPU can do, as far as the model backends care.

One fact matters today: whether the CPU has AMX (Intel's tile matrix units,
Sapphire Rapids and later). On such CPUs llama.cpp repacks weights into its AMX
"extra buffer", and the first matrix product there can crash the process with
SIGSEGV (llama.cpp issue 20824, machine-dependent and unfixed). The llama.cpp
backend therefore keeps extra buffers off on AMX CPUs unless asked, and the
host names AMX when a worker dies of a fault signal.

Imports nothing heavy: the host, the workers and the command line all use it.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: /proc/cpuinfo's names for AMX; any one of them means the CPU has the tile unit.
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The flags of the first CPU in ``cpuinfo`` (empty where there is no such file, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_amx(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU reports AMX."""
    return any(flag in (cpu_flags() if flags is None else flags) for flag in AMX_FLAGS)


def amx_advice(model: str) -> str:
    """What to do when a llama.cpp model crashed on an AMX CPU."""
    return (
        f"this CPU has AMX, where llama.cpp's AMX extra buffer is known to crash (llama.cpp issue 20824): "
        f"load {model!r} with extra buffers off (`llm-nb load {model} --option extra_buffers=false`, "
        f"`%llm_load {model} --option extra_buffers=false`)"
    )
