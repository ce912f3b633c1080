"""Reading vLLM's log: the stages of its start (a load's progress) and its last error (a failed start's answer)."""

from __future__ import annotations

import re
from pathlib import Path

from .workers import LOG_TAIL_LINES

#: vLLM's log lines that mark a stage of its start, and what the load's progress says of each.
STAGES = (
    (re.compile(r"llm-nb convert: (.*)"), 0.05, None),
    (re.compile(r"Initializing a V1 LLM engine"), 0.15, "starting the engine"),
    (re.compile(r"Starting to load model"), 0.2, "loading the weights"),
    (re.compile(r"Loading weights took ([\d.]+) ?s"), 0.3, "weights loaded in {0} s"),
    (re.compile(r"Warming up model|torch\.compile|Compiling a graph|Dynamo bytecode"), 0.4, "compiling the model"),
    (re.compile(r"Capturing CUDA graph"), 0.7, "capturing CUDA graphs"),
    (re.compile(r"KV cache size: ([\d,]+) tokens"), 0.85, "KV cache of {0} tokens"),
    (re.compile(r"Starting vLLM (?:API )?server on"), 0.95, "starting its API server"),
    (re.compile(r"\bERROR\b.*?\] (.*)"), None, "error: {0}"),
)


def stage_of(line: str) -> tuple[str, float | None] | None:
    for pattern, fraction, message in STAGES:
        match = pattern.search(line)
        if match:
            text = message.format(*match.groups()) if message else match.group(1)
            return text[:300], fraction
    return None


def error_lines(log_text: str, lines: int = LOG_TAIL_LINES) -> str:
    """vLLM's last error, from a failed start's log: from its last traceback or ERROR on, else the tail."""
    all_lines = [line for line in log_text.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(all_lines) if "Traceback" in line or " ERROR " in line]
    chosen = all_lines[starts[-1] :] if starts else all_lines
    if starts and len(chosen) < 3:
        chosen = all_lines[max(0, starts[-1] - 3) :]
    return "\n".join(chosen[-lines:])


def read_new(path: Path, offset: int) -> tuple[int, list[str]]:
    """Lines added to a log since ``offset`` (progress bars' carriage returns split lines too)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(1024 * 1024)
    except OSError:
        return offset, []
    end = max(data.rfind(b"\n"), data.rfind(b"\r"))
    if end < 0:
        return offset, []
    text = data[: end + 1].decode("utf-8", "replace")
    return offset + end + 1, [line for line in re.split(r"[\r\n]+", text) if line.strip()]
