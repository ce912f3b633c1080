"""Where vLLM comes from for the vllm backend: its environment, its options, the model folder it serves.

vLLM pins its own torch and transformers, so it runs from an environment of its
own, found by ``find_vllm``: ``LLM_NB_VLLM`` (a ``vllm`` executable, or the
python of a venv that has it), else the checkout's ``.venv-vllm`` that ``make
install-vllm`` makes, else ``vllm`` on PATH.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path

from .. import tool_format
from ..backends.base import coerce_option
from ..catalog import ModelSpec
from ..config import parse_size, vllm_setting
from ..errors import InvalidRequest

VENV_NAME = ".venv-vllm"
CHECKOUT = Path(__file__).resolve().parents[2]
INSTALL_HINT = (
    "the vllm backend needs vLLM, which this host cannot find: run `make install-vllm` in the llm-nb checkout "
    "(a venv of its own, found without further setting), or set LLM_NB_VLLM to a `vllm` executable or to the "
    "python of a venv that has vLLM"
)


def find_vllm() -> list[str] | None:
    """The command that runs vLLM's CLI here, or None."""
    named = vllm_setting()
    if named is not None:
        if not named.exists():
            return None
        if named.name.startswith("python"):
            return [str(named), "-m", "vllm.entrypoints.cli.main"]
        return [str(named)]
    for candidate in (CHECKOUT / VENV_NAME / "bin" / "vllm", shutil.which("vllm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    return None


#: The load options of the vllm backend (vLLM's other flags: ``--option args="--flag value ..."``).
LOAD_OPTIONS: dict[str, type] = {
    "n_ctx": int,  # --max-model-len
    "max_model_len": int,
    "kv_cache_bytes": str,  # --kv-cache-memory-bytes: a size, "2GiB" or bytes
    "max_num_seqs": int,
    "dtype": str,
    "device": str,  # "cpu" keeps the budget in RAM where a GPU is there
    "tool_call_parser": str,  # one of vLLM's, or "none"
    "args": str,
    "start_timeout": float,
    "timeout": float,
}


def checked_spec(spec: ModelSpec) -> ModelSpec:
    """The spec with its options checked and typed (a 400 that names the option, before anything is evicted),
    once vLLM is known to be here."""
    require_vllm()
    options = {key: coerce_option("vllm", key, value, LOAD_OPTIONS) for key, value in (spec.options or {}).items()}
    if "kv_cache_bytes" in options:
        options["kv_cache_bytes"] = parse_size(options["kv_cache_bytes"])
    try:
        shlex.split(options.get("args", ""))
    except ValueError as exc:
        raise InvalidRequest(f"option args={options['args']!r} does not read as shell words: {exc}") from None
    return dataclasses.replace(spec, options=options)


def require_vllm() -> list[str]:
    command = find_vllm()
    if command is None:
        named = vllm_setting()
        raise InvalidRequest(f"LLM_NB_VLLM names {named}, which does not exist" if named else INSTALL_HINT)
    return command


def vllm_python(command: list[str]) -> str:
    """The python of vLLM's environment (it converts GGUF files: it has torch, transformers and gguf)."""
    if len(command) > 1:  # [python, -m, ...]
        return command[0]
    script = Path(command[0])
    try:
        first = script.read_text(errors="replace").splitlines()[0]
        if first.startswith("#!") and "python" in first:
            return shlex.split(first[2:])[0]
    except (OSError, IndexError, ValueError):
        pass
    return str(script.with_name("python"))


def converted_folder(gguf: Path) -> Path:
    """Where the HF folder of a GGUF lives: by name and by what the file is (a changed file converts again)."""
    import platformdirs

    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem)[:80]
    return Path(platformdirs.user_cache_dir("llm-nb")) / "vllm-models" / f"{stem}-{digest}"


def chat_template(folder: Path) -> str:
    try:
        return (folder / "chat_template.jinja").read_text()
    except OSError:
        pass
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return ""
    if isinstance(template, list):  # named templates
        template = " ".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else ""


def tool_parser_for(template: str) -> str | None:
    """vLLM's tool-call parser for the syntax a chat template teaches, or None when none fits.

    Without one, ``auto`` tool calls are the host's own (``tool_format``), and ``required`` or a named
    tool is vLLM's guided JSON: an enabled parser that does not fit would turn that guiding off.
    """
    if "tools" not in template:
        return None
    if tool_format.CALL_OPEN in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None
