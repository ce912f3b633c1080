"""Run an engine the host does not own the code of (``vllm serve``) as a worker that ends with the host.

vLLM's API server starts its engine core and workers as processes of their
own; if the API server is killed, they live on as orphans holding the model's
memory (seen with SIGKILL: ``VLLM::EngineCore`` and ``VLLM::Worker`` stayed).
This process stands between the host and the engine, as ``llm_nb.ray_head``
does for Ray: it makes itself the child subreaper of the engine's whole tree,
and ends that tree when

- the host goes: the host closes the stdin pipe only it holds, or sends
  SIGTERM, or dies (``PR_SET_PDEATHSIG`` delivers SIGTERM here);
- the engine's own process ends for any reason: what it started goes too.

It then exits the way the engine did (the same exit code, or the same signal
raised on itself), so the host can say "killed by SIGKILL" of the engine.

    python -m llm_nb.keeper --parent-pid PID [--grace S] -- COMMAND ...
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from .processes import PR_SET_CHILD_SUBREAPER, die_with_parent, end_tree, set_prctl

DEFAULT_GRACE_S = 10.0
ORPHAN_GRACE_S = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_nb.keeper", description=__doc__.splitlines()[0])
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to keep")

    set_prctl(PR_SET_CHILD_SUBREAPER, 1)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    # SIGTERM, not SIGKILL, when the host dies: this process must live on to end the tree.
    die_with_parent(args.parent_pid, signal.SIGTERM, on_parent_gone=done.set)
    try:
        engine = subprocess.Popen(command, stdin=subprocess.DEVNULL)  # its output goes to our log file
    except OSError as exc:
        print(f"llm-nb keeper: cannot start {command[0]}: {exc}", file=sys.stderr, flush=True)
        return 127
    threading.Thread(target=lambda: (engine.wait(), done.set()), name="engine-watch", daemon=True).start()
    done.wait()
    if engine.poll() is None:
        print("llm-nb keeper: ending the engine and its processes", file=sys.stderr, flush=True)
        end_tree(args.grace)
    else:  # the engine is gone: what it left goes at once, so the host hears of its end in seconds
        end_tree(ORPHAN_GRACE_S)
    returncode = engine.wait()
    if returncode < 0:  # leave the way the engine left, so the host reads the same signal
        print(f"llm-nb keeper: the engine was killed by signal {-returncode}", file=sys.stderr, flush=True)
        if -returncode != signal.SIGKILL:  # SIGKILL has no handler to reset
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
