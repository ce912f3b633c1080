"""What a deployment's ``model.json`` asks to copy, and where to: every file planned and checked
before the first byte is written (``files.CopyJob`` then copies them).

``download_files_from`` is a local path, ``file://``, ``http(s)://`` or any
fsspec URL whose package is installed (one, or a list); ``download_files_to``
is a folder (relative paths are from the deployment folder and must stay in
it; default: the user cache dir). Every path that would land outside that
folder is refused.

Local sources are walked here, not through fsspec, so that nothing is opened
before the whole tree is checked: only regular files and folders are copied
(a device or a FIFO never ends, or blocks whoever opens it), and a symlink is
followed only while it stays inside the folder that was named.
"""

from __future__ import annotations

import json
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ...errors import BackendUnavailable, InvalidRequest, LlmNbError, ModelNotFound, PermissionDenied
from ...model_files import special_file_kind


def default_files_dir(name: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("llm-nb")) / "deployments" / name


@dataclass
class Planned:
    fs: Any  # None: a local file, read with os.open
    source: str
    rel: str
    size: int | None


def _is_url(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def safe_rel(rel: str, source: str) -> str:
    """A relative path that stays inside the target, or an error naming the culprit."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not parts or rel.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", rel):
        raise PermissionDenied(
            f"refusing to copy {source!r}: its path {rel!r} would land outside the download folder; "
            "rename it or fix download_files_from"
        )
    return "/".join(p for p in parts if p != ".")


def not_regular(shown: str, mode: int) -> InvalidRequest:
    kind = special_file_kind(mode)
    return InvalidRequest(
        f"{shown} is a {kind}, not a regular file: only regular files and folders are copied "
        "(a device or a pipe may never end). Point download_files_from at the model's files"
    )


# --- planning: every file to copy, checked before anything is written ---------------------------
def _plan_local(root: Path, source: str) -> list[Planned]:
    """A local file or folder: regular files only, symlinks only while they stay inside ``root``."""
    try:
        # os.stat, never open: opening a FIFO blocks until a writer comes.
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        raise ModelNotFound(f"download_files_from names {source!r}, which does not exist") from None
    except OSError as exc:
        raise LlmNbError(f"cannot read {source!r}: {exc}", code="download_failed") from exc
    if stat.S_ISREG(mode):
        return [Planned(None, str(root), safe_rel(root.name, str(root)), os.stat(root).st_size)]
    if not stat.S_ISDIR(mode):
        raise not_regular(f"download_files_from {source!r}", mode)
    planned: list[Planned] = []

    def visit(folder: Path, rel: PurePosixPath, ancestors: frozenset[Path]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise LlmNbError(f"cannot read {folder} (in {source!r}): {exc}", code="download_failed") from exc
        for entry in entries:
            shown = root / rel / entry.name  # as the user sees it: through the links followed so far
            try:
                real = Path(entry.path).resolve(strict=True)
            except (OSError, RuntimeError) as exc:  # a dangling link, a loop of links, a file gone
                if not entry.is_symlink():
                    raise LlmNbError(f"cannot read {shown}: {exc}", code="download_failed") from exc
                raise InvalidRequest(
                    f"{shown} is a symlink to {os.readlink(entry.path)!r}, which does not resolve; "
                    "remove the link or make it point at a file inside the folder"
                ) from None
            if not real.is_relative_to(root):
                raise InvalidRequest(
                    f"{shown} is a symlink to {real}, outside {root}: links that leave the folder are not "
                    "followed. Copy the file into the folder, or name its own location in download_files_from"
                )
            mode = os.stat(real).st_mode
            if stat.S_ISDIR(mode):
                if real in ancestors:
                    raise InvalidRequest(
                        f"{shown} is a symlink to {real}, a folder it is inside: a loop; remove the link"
                    )
                visit(real, rel / entry.name, ancestors | {real})
            elif stat.S_ISREG(mode):
                rel_path = str(rel / entry.name)
                planned.append(Planned(None, str(real), safe_rel(rel_path, str(shown)), os.stat(real).st_size))
            else:
                raise not_regular(str(shown), mode)

    visit(root, PurePosixPath(), frozenset({root}))
    return planned


def _plan_fsspec(fs: Any, path: str, source: str) -> list[Planned]:
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
    planned: list[Planned] = []
    if is_dir:
        prefix = path.rstrip("/") + "/"
        found = fs.find(path, detail=True, withdirs=False)  # http needs the trailing slash kept
        for file_path, info in sorted(found.items()):
            if not file_path.startswith(prefix):
                # An index page that links above its folder.
                safe_rel("../" + file_path.rsplit("/", 1)[-1], file_path)
            rel = file_path[len(prefix) :]
            if web_like:
                rel = urllib.parse.unquote(rel.split("?", 1)[0])
            planned.append(Planned(fs, file_path, safe_rel(rel, file_path), info.get("size")))
    else:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if web_like:
            name = urllib.parse.unquote(name.split("?", 1)[0])
        planned.append(Planned(fs, path, safe_rel(name, path), fs.info(path).get("size")))
    return planned


def plan_copy(sources: list[str], base: Path) -> list[Planned]:
    """Every file to copy: (filesystem, source path, path relative to the target, size)."""
    import fsspec

    planned: list[Planned] = []
    for source in sources:
        if not isinstance(source, str) or not source.strip():
            raise InvalidRequest(f"download_files_from entries must be paths or URLs, not {source!r}")
        if not _is_url(source):
            planned += _plan_local((base / Path(source).expanduser()).resolve(), source)
            continue
        try:
            fs, path = fsspec.core.url_to_fs(source)
        except (ImportError, ValueError) as exc:
            protocol = source.split("://", 1)[0]
            raise BackendUnavailable(
                f"cannot read {source!r}: {exc}. Install the fsspec package for {protocol}:// "
                f"(s3fs for s3, gcsfs for gs, adlfs for az) in the host's environment"
            ) from exc
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in ("file", "local"):
            planned += _plan_local(Path(path).resolve(), source)
        else:
            planned += _plan_fsspec(fs, path, source)
    return planned


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


def download_folder(target: Any, folder: Path) -> Path:
    """``download_files_to`` as a folder: absolute as given, else inside the deployment folder, never above it."""
    if not isinstance(target, str) or not target.strip():
        raise InvalidRequest(f"model.json download_files_to must be a folder path, not {target!r}")
    path = Path(target).expanduser()
    if path.is_absolute():  # the user's explicit choice
        return path
    inside = folder.resolve()
    resolved = (inside / path).resolve()
    if not resolved.is_relative_to(inside):
        how = "climbs out of" if ".." in path.parts else "leads, through a symlink, out of"
        raise InvalidRequest(
            f"model.json download_files_to {target!r} {how} the deployment folder {folder} (to {resolved}): "
            "a relative path must stay inside it. Name a folder inside it, or give an absolute path"
        )
    return inside / path


def files_to_copy(model_json: dict, folder: Path, name: str) -> tuple[list[str], Path | None]:
    """What ``model.json`` asks to copy and where to: (sources, download folder or None)."""
    sources = model_json.get("download_files_from")
    if isinstance(sources, str):
        sources = [sources]
    target = model_json.get("download_files_to")
    files_dir = download_folder(target, folder) if target not in (None, "") else None
    if not sources:
        return [], files_dir
    if not isinstance(sources, list):
        raise InvalidRequest("model.json download_files_from must be a path or URL, or a list of them")
    return list(sources), files_dir or default_files_dir(name)
