"""Child processes' lives: how they end with their parent, and what is said of one that ended.

``die_with_parent`` is how a process the host starts (a model worker, the Ray
head's keeper) never outlives it.

A host's exit is recorded beside its connection file (``<name>.exit.json``) by
the process that waits on it (the launcher a client starts, or the Jupyter
server's supervisor), so that any client, not only the parent, can say how the
previous host ended: a signal, an exit code, or the kernel's OOM killer.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: How long after a host's death the OOM rule holds: its models are not loaded again by themselves.
OOM_HOLD_S = 60.0


def set_prctl(option: int, value: int) -> None:
    """Linux's prctl; a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
        except (OSError, AttributeError):
            pass


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(
    parent_pid: int, death_signal: int = signal.SIGKILL, on_parent_gone: Callable[[], None] | None = None
) -> None:
    """End with the parent however it died: ``PR_SET_PDEATHSIG`` sends ``death_signal``, and EOF on the
    stdin pipe that only the parent holds calls ``on_parent_gone`` (default: exit at once)."""
    set_prctl(PR_SET_PDEATHSIG, death_signal)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(3)

    def wait_for_eof() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        (on_parent_gone or (lambda: os._exit(0)))()

    threading.Thread(target=wait_for_eof, name="parent-watch", daemon=True).start()


def end_tree(grace: float, root: int | None = None) -> None:
    """SIGTERM every descendant of ``root`` (default: this process), then SIGKILL what is left after
    ``grace`` seconds. Looks again after each round: a dying parent may still start a child (Ray's raylet)."""
    import psutil  # not needed by the kernel side's users of this module

    try:
        top = psutil.Process(root)
    except psutil.Error:
        return
    for _ in range(3):
        try:
            children = top.children(recursive=True)
        except psutil.Error:
            return
        if not children:
            return
        for child in children:
            try:
                child.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(children, timeout=grace)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=1.0)


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


def oom_kill_line(pid: int) -> str | None:
    """The kernel's "Out of memory: Killed process PID" log line, if it killed ``pid`` and the log is readable.

    Reads ``/dev/kmsg`` without blocking (each read is one record); where it is
    not readable (``dmesg_restrict``, containers), the answer is unknown: None.
    """
    pattern = re.compile(rf"Killed process {int(pid)}\b")
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = None
    try:
        for _ in range(100_000):  # the ring buffer is finite; this bounds a misbehaving device
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break  # read everything there is
            except OSError as exc:
                if exc.errno == 32:  # EPIPE: a record was overwritten while reading; go on
                    continue
                break
            if not record:
                break
            text = record.decode("utf-8", "replace")
            if pattern.search(text):
                found = text.split(";", 1)[-1].strip()
    finally:
        os.close(fd)
    return found


def exit_record_path(connection_file: Path) -> Path:
    return Path(connection_file).with_suffix(".exit.json")


def record_exit(connection_file: Path, pid: int, returncode: int | None) -> dict:
    """Write how host ``pid`` ended next to its connection file (atomically), and return the record."""
    oom = oom_kill_line(pid) if returncode == -signal.SIGKILL else None
    if returncode is None:
        reason = "ended (its exit status is unknown)"
    elif returncode == 0:
        reason = "stopped on request (exit code 0)"
    else:
        reason = describe_exit(returncode)
    if oom:
        reason = f"was killed by the kernel's OOM killer (SIGKILL): {oom}"
    record = {"pid": pid, "returncode": returncode, "reason": reason, "oom": bool(oom), "at": time.time()}
    path = exit_record_path(connection_file)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return record


def read_exit(connection_file: Path, pid: int, wait: float = 0.0) -> dict | None:
    """The exit record of host ``pid``, waiting up to ``wait`` seconds for its parent to write it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            record = json.loads(exit_record_path(connection_file).read_text())
            if isinstance(record, dict) and record.get("pid") == pid:
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def how_host_ended(connection_file: Path, pid: int, wait: float = 0.0) -> tuple[str, dict | None]:
    """``("was killed by SIGKILL", record)``: what to say after "the host (pid N)"."""
    record = read_exit(connection_file, pid, wait)
    if record is not None:
        return record["reason"], record
    oom = oom_kill_line(pid)
    if oom:
        record = {"pid": pid, "returncode": -signal.SIGKILL, "oom": True, "at": time.time()}
        return f"was killed by the kernel's OOM killer (SIGKILL): {oom}", record
    return "is gone (how it ended was not recorded)", None
