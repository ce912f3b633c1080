"""Copying a deployment's model files: what ``model.json`` names, into its download folder.

``download_files_from`` is a local path, ``file://``, ``http(s)://`` or any
fsspec URL whose package is installed (one, or a list); ``download_files_to``
is a folder (relative paths are from the deployment folder and must stay in
it; default: the user cache dir). Every path that would land outside that
folder is refused, and a file already there with the same size is kept (the
cache).

Local sources are walked here, not through fsspec, so that nothing is opened
before the whole tree is checked: only regular files and folders are copied
(a device or a FIFO never ends, or blocks whoever opens it), and a symlink is
followed only while it stays inside the folder that was named. A refusal comes
before the first byte is written.

A ``CopyJob`` runs the copy in a daemon thread, chunk by chunk, checking a
cancel flag between chunks, so it never blocks the event loop, and a thread
stuck in a read never keeps the host from exiting. It stops at the size cap
(``LLM_NB_MAX_DOWNLOAD``), before the disk fills (``LLM_NB_MIN_FREE_DISK`` stays
free), after ``LLM_NB_COPY_STALL`` seconds without a byte, and at once when
cancelled; each way its partial file is removed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ...config import Settings, format_bytes
from ...errors import BackendUnavailable, InvalidRequest, LlmNbError, ModelNotFound, PermissionDenied
from ...model_files import special_file_kind

CHUNK = 1024 * 1024
PROGRESS_EVERY_S = 0.2
Progress = Callable[[dict], None]


def default_files_dir(name: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("llm-nb")) / "deployments" / name


@dataclass
class _Planned:
    fs: Any  # None: a local file, read with os.open
    source: str
    rel: str
    size: int | None


@dataclass
class CopyLimits:
    max_bytes: int
    min_free: int
    stall_s: float  # <= 0: never

    @classmethod
    def from_settings(cls, settings: Settings) -> CopyLimits:
        return cls(settings.max_download, settings.min_free_disk, settings.copy_stall)


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


def _not_regular(shown: str, mode: int) -> InvalidRequest:
    kind = special_file_kind(mode)
    return InvalidRequest(
        f"{shown} is a {kind}, not a regular file: only regular files and folders are copied "
        "(a device or a pipe may never end). Point download_files_from at the model's files"
    )


# --- planning: every file to copy, checked before anything is written ---------------------------
def _plan_local(root: Path, source: str) -> list[_Planned]:
    """A local file or folder: regular files only, symlinks only while they stay inside ``root``."""
    try:
        # os.stat, never open: opening a FIFO blocks until a writer comes.
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        raise ModelNotFound(f"download_files_from names {source!r}, which does not exist") from None
    except OSError as exc:
        raise LlmNbError(f"cannot read {source!r}: {exc}", code="download_failed") from exc
    if stat.S_ISREG(mode):
        return [_Planned(None, str(root), _safe_rel(root.name, str(root)), os.stat(root).st_size)]
    if not stat.S_ISDIR(mode):
        raise _not_regular(f"download_files_from {source!r}", mode)
    planned: list[_Planned] = []

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
                planned.append(_Planned(None, str(real), _safe_rel(rel_path, str(shown)), os.stat(real).st_size))
            else:
                raise _not_regular(str(shown), mode)

    visit(root, PurePosixPath(), frozenset({root}))
    return planned


def _plan_fsspec(fs: Any, path: str, source: str) -> list[_Planned]:
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
    planned: list[_Planned] = []
    if is_dir:
        prefix = path.rstrip("/") + "/"
        found = fs.find(path, detail=True, withdirs=False)  # http needs the trailing slash kept
        for file_path, info in sorted(found.items()):
            if not file_path.startswith(prefix):
                # An index page that links above its folder.
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


def plan_copy(sources: list[str], base: Path) -> list[_Planned]:
    """Every file to copy: (filesystem, source path, path relative to the target, size)."""
    import fsspec

    planned: list[_Planned] = []
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


# --- copying ------------------------------------------------------------------------------------
def _open_local(path: str):
    """Open for reading without blocking, and only if it is still a regular file (it may have been swapped)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class CopyJob:
    """One deploy's copy: run in a daemon thread, watched from the event loop, cancellable.

    ``bytes_done`` and ``total`` are read by the deployments' listing while it runs.
    """

    def __init__(self, sources: list[str], base: Path, target: Path, limits: CopyLimits, progress: Progress):
        self.sources = sources
        self.base = base
        self.target = target
        self.limits = limits
        self.progress = progress
        self.bytes_done = 0  # bytes written by this job (cached files not counted)
        self.total: int | None = None
        self.file: str | None = None
        self.last_activity = time.monotonic()
        self.error: LlmNbError | None = None  # why it was cancelled
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._parts: set[Path] = set()

    # --- from the event loop ----------------------------------------------------------
    async def run(self) -> list[dict]:
        """Copy in a daemon thread; fail on a stall; cancelling the awaiting task cancels the copy."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # settled after a stall or cancel

        def settle(result: Any, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def work() -> None:
            try:
                outcome = (self._copy(), None)
            except BaseException as exc:  # handed to the loop, raised there
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(settle, *outcome)
            except RuntimeError:  # the loop is closed: the host is gone
                pass

        self.last_activity = time.monotonic()
        # A daemon thread, not the loop's executor: one stuck in a read must not hold up the exit.
        threading.Thread(target=work, name=f"copy to {self.target}", daemon=True).start()
        stall = self.limits.stall_s
        try:
            while True:
                await asyncio.wait({done}, timeout=min(1.0, stall / 4) if stall > 0 else None)
                if done.done():
                    return done.result()
                idle = time.monotonic() - self.last_activity
                if stall > 0 and idle > stall:
                    what = f"copying {self.file}" if self.file else "reading download_files_from"
                    self.cancel(
                        LlmNbError(
                            f"{what} made no progress for {idle:.0f} s (LLM_NB_COPY_STALL is {stall:g} s) "
                            f"after {format_bytes(self.bytes_done)}: the source stopped sending. Check that "
                            "it is reachable and deploy again, or raise LLM_NB_COPY_STALL for a slow source",
                            code="download_stalled",
                            status=504,
                        )
                    )
                    raise self.error
        except asyncio.CancelledError:
            self.cancel(LlmNbError("the copy was cancelled", code="deploy_cancelled", status=409))
            raise

    def cancel(self, error: LlmNbError) -> None:
        """Stop at the next chunk and remove the partial files now (the thread may be stuck in a read)."""
        with self._lock:
            if self.error is None:
                self.error = error
            self._cancelled.set()
            for part in self._parts:
                part.unlink(missing_ok=True)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- in the thread ------------------------------------------------------------------
    def _check(self) -> None:
        if self._cancelled.is_set():
            raise self.error or LlmNbError("the copy was cancelled", code="deploy_cancelled", status=409)

    def _emit(self, event: dict) -> None:
        try:
            self.progress(event)
        except RuntimeError:  # the loop is closed: the host is stopping
            self.cancel(LlmNbError("the host stopped during the copy", code="host_stopping", status=503))

    def _copy(self) -> list[dict]:
        planned = plan_copy(self.sources, self.base)
        self._check()
        self.last_activity = time.monotonic()
        root = self.target.resolve()
        # Every destination checked and the sizes known to fit before the first byte is written.
        todo: list[tuple[_Planned, Path, bool]] = []
        for item in planned:
            dest = (root / item.rel).resolve()
            if not dest.is_relative_to(root):  # a symlink inside the target pointing out of it
                _safe_rel("../" + item.rel, item.source)
            cached = item.size is not None and dest.is_file() and dest.stat().st_size == item.size
            todo.append((item, dest, cached))
        self.total = sum(item.size or 0 for item in planned)
        self._check_room(sum(item.size or 0 for item, _, cached in todo if not cached))
        self.target.mkdir(parents=True, exist_ok=True)

        done = 0
        copied: list[dict] = []
        for index, (item, dest, cached) in enumerate(todo):
            self._check()
            self.file = item.rel
            if cached:
                done += item.size
                copied.append({"path": item.rel, "size": item.size, "cached": True})
            else:
                size = self._copy_one(item, dest, done)
                done += size
                copied.append({"path": item.rel, "size": size, "cached": False})
            self._emit({"stage": "download", "file": item.rel, "bytes": done, "total": self.total, "files": index + 1})
        return copied

    def _check_room(self, need: int) -> None:
        limits = self.limits
        if need > limits.max_bytes:
            raise self._too_large(f"the files to copy add up to {format_bytes(need)}")
        existing = next(p for p in (self.target, *self.target.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if need > free - limits.min_free:
            raise self._disk_full(
                f"the files to copy need {format_bytes(need)}, and the disk has {format_bytes(free)} free, "
                f"of which {format_bytes(limits.min_free)} stays free (LLM_NB_MIN_FREE_DISK)"
            )

    def _too_large(self, what: str) -> LlmNbError:
        return LlmNbError(
            f"{what}, over the host's cap of {format_bytes(self.limits.max_bytes)} per deploy "
            "(LLM_NB_MAX_DOWNLOAD): nothing is kept. Check that download_files_from names what you meant "
            "(not an endless source), or raise LLM_NB_MAX_DOWNLOAD for the host",
            code="download_too_large",
            status=413,
        )

    def _disk_full(self, what: str) -> LlmNbError:
        return LlmNbError(
            f"not enough room under {self.target}: {what}. Free space there, or point download_files_to "
            "in model.json at a disk with room",
            code="disk_full",
            status=507,
        )

    def _copy_one(self, item: _Planned, dest: Path, done_before: int) -> int:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with self._lock:  # after a cancel no new partial file appears
            self._check()
            self._parts.add(part)
        size = 0
        last = 0.0
        try:
            opener = _open_local(item.source) if item.fs is None else item.fs.open(item.source, "rb")
            with opener as src, open(part, "wb") as out:
                while True:
                    self._check()
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    self._check()
                    self.last_activity = time.monotonic()
                    if self.bytes_done + len(chunk) > self.limits.max_bytes:
                        raise self._too_large(f"copying {item.source} went past {format_bytes(self.bytes_done)}")
                    free = shutil.disk_usage(part.parent).free
                    if free - len(chunk) < self.limits.min_free:
                        raise self._disk_full(
                            f"copying {item.source} stopped after {format_bytes(size)} with "
                            f"{format_bytes(free)} left on the disk, which keeps "
                            f"{format_bytes(self.limits.min_free)} free (LLM_NB_MIN_FREE_DISK)"
                        )
                    out.write(chunk)
                    size += len(chunk)
                    self.bytes_done += len(chunk)
                    now = time.monotonic()
                    if now - last > PROGRESS_EVERY_S:
                        last = now
                        event = {"stage": "download", "file": item.rel, "bytes": done_before + size}
                        self._emit({**event, "total": self.total})
            self._check()
            os.replace(part, dest)
        except Exception as exc:
            part.unlink(missing_ok=True)
            if isinstance(exc, LlmNbError):
                raise
            if self.cancelled:
                raise self.error from exc
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._disk_full(
                    f"the disk is full: copying {item.source} stopped after {size} bytes ({self.total} needed in all)"
                ) from exc
            raise LlmNbError(
                f"copying {item.source} to {dest} failed: {type(exc).__name__}: {exc}", code="download_failed"
            ) from exc
        finally:
            with self._lock:
                self._parts.discard(part)
        return size


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
