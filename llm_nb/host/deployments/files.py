"""Copying a deployment's model files: what ``model.json`` names, into its download folder.

``download_files_from`` is a local path, ``file://``, ``http(s)://`` or any
fsspec URL whose package is installed (one, or a list); ``download_files_to``
is a folder (relative paths are from the deployment folder; default: the user
cache dir). Every path that would land outside that folder is refused, and a
file already there with the same size is kept (the cache).
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ...errors import BackendUnavailable, InvalidRequest, LlmNbError, ModelNotFound, PermissionDenied

CHUNK = 1024 * 1024
Progress = Callable[[dict], None]


def default_files_dir(name: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("llm-nb")) / "deployments" / name


@dataclass
class _Planned:
    fs: Any
    source: str
    rel: str
    size: int | None


def _is_url(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def _safe_rel(rel: str, source: str) -> str:
    """A relative path that stays inside the target, or an error naming the culprit."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not parts or rel.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", rel):
        raise PermissionDenied(
            f"refusing to copy {source!r}: its path {rel!r} would land outside the download folder; "
            "rename it or fix download_files_from"
        )
    return "/".join(p for p in parts if p != ".")


def plan_copy(sources: list[str], base: Path) -> list[_Planned]:
    """Every file to copy: (filesystem, source path, path relative to the target, size)."""
    import fsspec

    planned: list[_Planned] = []
    for source in sources:
        if not isinstance(source, str) or not source.strip():
            raise InvalidRequest(f"download_files_from entries must be paths or URLs, not {source!r}")
        location = source if _is_url(source) else str((base / Path(source).expanduser()).resolve())
        try:
            fs, path = fsspec.core.url_to_fs(location)
        except (ImportError, ValueError) as exc:
            protocol = location.split("://", 1)[0]
            raise BackendUnavailable(
                f"cannot read {source!r}: {exc}. Install the fsspec package for {protocol}:// "
                f"(s3fs for s3, gcsfs for gs, adlfs for az) in the host's environment"
            ) from exc
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        web_like = protocol in ("http", "https")
        try:
            is_dir = fs.isdir(path)
            if not is_dir and not fs.exists(path):
                raise FileNotFoundError(path)
        except FileNotFoundError:
            raise ModelNotFound(f"download_files_from names {source!r}, which does not exist") from None
        except Exception as exc:  # any fsspec backend: auth, network
            raise LlmNbError(f"cannot read {source!r}: {type(exc).__name__}: {exc}", code="download_failed") from exc
        if is_dir:
            prefix = path.rstrip("/") + "/"
            found = fs.find(path, detail=True, withdirs=False)  # http needs the trailing slash kept
            for file_path, info in sorted(found.items()):
                if not file_path.startswith(prefix):
                    # An index page that links above its folder, or a symlink out of it.
                    _safe_rel("../" + file_path.rsplit("/", 1)[-1], file_path)
                rel = file_path[len(prefix) :]
                if web_like:
                    rel = urllib.parse.unquote(rel.split("?", 1)[0])
                planned.append(_Planned(fs, file_path, _safe_rel(rel, file_path), info.get("size")))
        else:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if web_like:
                name = urllib.parse.unquote(name.split("?", 1)[0])
            planned.append(_Planned(fs, path, _safe_rel(name, path), fs.info(path).get("size")))
    return planned


def copy_files(sources: list[str], base: Path, target: Path, progress: Progress) -> list[dict]:
    """Copy with progress; a file already there with the same size is kept (the cache)."""
    planned = plan_copy(sources, base)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    total = sum(p.size or 0 for p in planned)
    done = 0
    copied: list[dict] = []
    last = 0.0
    for index, item in enumerate(planned):
        dest = (root / item.rel).resolve()
        if not dest.is_relative_to(root):  # a symlink inside the target pointing out of it
            _safe_rel("../" + item.rel, item.source)
        if item.size is not None and dest.is_file() and dest.stat().st_size == item.size:
            done += item.size
            copied.append({"path": item.rel, "size": item.size, "cached": True})
            progress({"stage": "download", "file": item.rel, "bytes": done, "total": total, "files": index + 1})
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        size = 0
        try:
            with item.fs.open(item.source, "rb") as src, open(part, "wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    size += len(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last > 0.2:
                        last = now
                        progress({"stage": "download", "file": item.rel, "bytes": done, "total": total})
            os.replace(part, dest)
        except Exception as exc:
            part.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LlmNbError(
                    f"the disk under {target} is full: copying {item.source} stopped after {size} bytes "
                    f"({total} needed in all). Free space there, or point download_files_to in model.json "
                    "at a disk with room",
                    code="disk_full",
                    status=507,
                ) from exc
            raise LlmNbError(
                f"copying {item.source} to {dest} failed: {type(exc).__name__}: {exc}", code="download_failed"
            ) from exc
        copied.append({"path": item.rel, "size": size, "cached": False})
        progress({"stage": "download", "file": item.rel, "bytes": done, "total": total, "files": index + 1})
    return copied


def read_model_json(folder: Path) -> dict:
    path = folder / "model.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path} must hold a JSON object")
    return data


def files_to_copy(model_json: dict, folder: Path, name: str) -> tuple[list[str], Path | None]:
    """What ``model.json`` asks to copy and where to: (sources, download folder or None)."""
    sources = model_json.get("download_files_from")
    if isinstance(sources, str):
        sources = [sources]
    target = model_json.get("download_files_to")
    if not sources:
        return [], (folder / Path(target).expanduser()) if target else None
    if target is not None and not isinstance(target, str):
        raise InvalidRequest("model.json download_files_to must be a folder path")
    return list(sources), (folder / Path(target).expanduser()) if target else default_files_dir(name)
