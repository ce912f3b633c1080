"""What the host's supervisor and the host itself say about a child process that ended."""

from __future__ import annotations

import os
import signal


def describe_exit(returncode: int | None) -> str:
    """``"was killed by SIGKILL"`` or ``"exited with code 1"``: a return code, to follow "the host"."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def tail(path: str | os.PathLike, lines: int) -> str:
    """The last ``lines`` lines of a log file (from its last 64 KiB); "" when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
