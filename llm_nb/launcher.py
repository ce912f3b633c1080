"""``python -m llm_nb.launcher --connection-file F [host args]``: run a host and record how it ends.

A host that a kernel or the CLI starts is detached from it: the kernel may exit
long before the host does, and then nobody would be left to read the host's exit
status. This small parent stays with the host instead, waits on it, and writes
the exit record (``processes.record_exit``: signal, code, OOM killer) beside the
connection file, so that the next client can say what happened to the previous
host. It forwards SIGTERM, SIGINT and SIGHUP to the host and exits with its
status. It imports no model library and nothing of ``llm_nb.host``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from .processes import record_exit


def main(argv: list[str]) -> int:
    try:
        connection_file = Path(argv[argv.index("--connection-file") + 1])
    except (ValueError, IndexError):
        print("llm_nb.launcher: --connection-file FILE is required", file=sys.stderr)
        return 2
    host = subprocess.Popen([sys.executable, "-m", "llm_nb.host", *argv], stdin=subprocess.DEVNULL)

    def forward(signum, _frame) -> None:
        if host.poll() is None:
            host.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            returncode = host.wait()
            break
        except InterruptedError:  # pragma: no cover - wait() retries EINTR itself since PEP 475
            continue
    record_exit(connection_file, host.pid, returncode)
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
