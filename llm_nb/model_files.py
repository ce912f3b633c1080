"""What is wrong with a model path, said as a 400 before a worker tries it (or after one failed on it).

The cheap checks (what the path is, its first bytes) run on every load; the full GGUF
check (every tensor inside the file) costs a second or two, so it runs only to explain a
load that failed.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"
_GGUF_HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), metadata count (u64)


_SPECIAL_KINDS = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
}


def special_file_kind(mode: int) -> str:
    """What a path that is neither a regular file nor a folder is, from its ``st_mode``."""
    return _SPECIAL_KINDS.get(stat.S_IFMT(mode), "special file")


def path_problem(path: str | Path, backend: str, options: dict | None = None) -> str | None:
    """Why ``path`` cannot be a model for ``backend``, from what it is and how it starts; None if it may be."""
    path = Path(path)
    try:
        info = os.stat(path)  # never open before knowing: opening a FIFO blocks
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(info.st_mode):
        if backend == "llamacpp":
            return "is a folder; the llama.cpp backend loads one .gguf file"
        gguf_file = (options or {}).get("gguf_file")
        if gguf_file:
            return path_problem(path / str(gguf_file), backend)
        if not (path / "config.json").is_file():
            return "is a folder without config.json: not a Hugging Face model folder"
        return None
    if not stat.S_ISREG(info.st_mode):
        return f"is a {special_file_kind(info.st_mode)}, not a regular file or folder"
    if info.st_size == 0:
        return "is empty (0 bytes)"
    try:
        with open(path, "rb") as file:
            head = file.read(_GGUF_HEADER_BYTES)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if head[:4] != GGUF_MAGIC:
        if backend == "llamacpp":
            return f"is not a GGUF file (it starts with {head[:8]!r}); the llama.cpp backend loads .gguf files"
        return (
            f"is a file but not a GGUF file (it starts with {head[:8]!r}); the {backend} backend loads "
            "a model folder (with config.json) or a .gguf file"
        )
    if len(head) < _GGUF_HEADER_BYTES:
        return f"is truncated: {info.st_size} bytes is less than a GGUF header"
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (1, 2, 3):
        return f"is not a GGUF file this build reads (format version {version})"
    return None


def gguf_problem(path: str | Path) -> str | None:
    """Why a GGUF file does not load: truncated or corrupt inside (reads every tensor's header)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as exc:  # the reader's own errors on a damaged file are IndexError, ValueError...
        return f"is truncated or corrupt: its GGUF structure does not read ({type(exc).__name__}: {exc})"
    size = os.path.getsize(path)
    if end > size:
        return f"is truncated: its tensors need {end} bytes but the file has {size}"
    return None
