"""Loads whose worker just died of a fault signal, refused for a while when asked for the same way.

A segfault at the first decode (an AMX CPU, a bad build) would only come back, and the
notebook would read the same crash twice: for ``CRASH_HOLD_S`` a load of the same model
with the same options is refused with what was said of the crash (409 ``crashed_recently``).
"""

from __future__ import annotations

import json
import time

from ..catalog import ModelSpec
from ..errors import CrashedRecently
from .workers import WatchedProcess, crash_advice, fault_signal

#: How long after a worker died of a fault signal a load of the same model, the same way, is refused.
CRASH_HOLD_S = 60.0


def load_key(spec: ModelSpec) -> tuple:
    """A model loaded a given way, whatever its name: what a crash is remembered by."""
    return (spec.backend, spec.path, spec.url, json.dumps(spec.options or {}, sort_keys=True, default=str))


class CrashMemory:
    def __init__(self) -> None:
        #: (monotonic time, what was said of the crash) by load_key.
        self._crashes: dict[tuple, tuple[float, str]] = {}

    def remember(self, worker: WatchedProcess) -> None:
        """A worker ended: remember it if a fault signal ended it."""
        if fault_signal(worker.returncode):
            advice = crash_advice(worker.spec, worker.returncode)
            self._crashes[load_key(worker.spec)] = (
                time.monotonic(),
                worker.crash_reason() + (f"\n{advice}" if advice else ""),
            )

    def refuse(self, spec: ModelSpec) -> None:
        """Raise when ``spec`` is loaded the way that crashed less than ``CRASH_HOLD_S`` ago."""
        key = load_key(spec)
        crash = self._crashes.get(key)
        if crash is None:
            return
        at, reason = crash
        age = time.monotonic() - at
        if age >= CRASH_HOLD_S:
            del self._crashes[key]
            return
        wait = CRASH_HOLD_S - age
        raise CrashedRecently(
            f"not loading {spec.name!r}: {age:.0f} s ago {reason}\n"
            f"It was loaded the same way, so it would crash again. Load it with other options, or retry in {wait:.0f} s.",
            retry_after=max(1, round(wait)),
        )
