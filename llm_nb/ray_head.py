"""A local Ray head that the host owns: started on first use, gone with the host.

``ray start --head`` daemonises the head's processes (GCS, raylet, agents, log
monitor, and later every replica's worker) and exits, so a signal to the host
never reaches them and they would outlive it. This process stays between them
and the host: it makes itself their child subreaper (``PR_SET_CHILD_SUBREAPER``),
so every process of the head remains its descendant, and it ends that whole
tree when the host goes: ``llm-nb stop`` (the host closes the pipe or sends
SIGTERM), or the host's death (EOF on the stdin pipe only the host holds, and
``PR_SET_PDEATHSIG`` delivering SIGTERM), the same rules a model worker follows.

The host runs ``python -m llm_nb.ray_head --parent-pid PID ...``; this prints
one JSON line, ``{"address": "127.0.0.1:PORT"}`` or ``{"error": ...}``, then
waits. Only the tree below it is ended: a Ray cluster the user started
elsewhere on the machine is never touched (``ray stop`` would end them all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

from .processes import PR_SET_CHILD_SUBREAPER, die_with_parent, end_tree, set_prctl

START_TIMEOUT_S = 120.0
HEAD_MARKER_ENV = "LLM_NB_RAY_HEAD"
TERM_GRACE_S = 2.0


PORT_FLAGS = (
    "--port",  # the GCS: the address drivers connect to
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)
START_ATTEMPTS = 3  # a port picked free may be taken before Ray binds it


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: the sockets stay bound until all are picked, so none comes twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))  # every interface: Ray binds some of them beyond loopback
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ray_start_command(args: argparse.Namespace, ports: dict[str, int]) -> list[str]:
    # Every port a head would otherwise take at a fixed default (6379, 10001, 52365, ...) is
    # picked free, so this head starts beside another one, the user's own included.
    command = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    return command + [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={args.num_cpus}",
        f"--object-store-memory={args.object_store_memory}",
        f"--temp-dir={args.temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_nb.ray_head", description=__doc__.splitlines()[0])
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--object-store-memory", type=int, required=True)
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args(argv)

    set_prctl(PR_SET_CHILD_SUBREAPER, 1)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    # SIGTERM, not SIGKILL, when the host dies: this process must live on to end the tree.
    die_with_parent(args.parent_pid, signal.SIGTERM, on_parent_gone=done.set)
    answer: dict = {}
    for _ in range(START_ATTEMPTS):
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        try:
            started = subprocess.run(
                ray_start_command(args, ports),
                # Every process of the head inherits this: the host finds them by it if this keeper is killed.
                env={**os.environ, HEAD_MARKER_ENV: args.temp_dir},
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr,  # the host's log file
                stderr=sys.stderr,
                timeout=START_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            answer = {"error": f"`ray start --head` did not finish within {START_TIMEOUT_S:.0f} s"}
            break
        if started.returncode == 0:
            answer = {"address": f"127.0.0.1:{ports['--port']}", "pid": os.getpid()}
            break
        answer = {"error": f"`ray start --head` failed with exit code {started.returncode}"}
        end_tree(TERM_GRACE_S)  # what a failed start left, before the next try
        if done.is_set():
            break
    print(json.dumps(answer), flush=True)
    if "address" in answer:
        done.wait()
    end_tree(TERM_GRACE_S)
    shutil.rmtree(args.temp_dir, ignore_errors=True)
    return 0 if "address" in answer else 1


if __name__ == "__main__":
    sys.exit(main())
