"""Copying a deployment's model files into its download folder (``sources`` plans what and where).

A ``CopyJob`` runs the copy in a daemon thread, chunk by chunk, checking a
cancel flag between chunks, so it never blocks the event loop, and a thread
stuck in a read never keeps the host from exiting. A file already there with
the same size is kept (the cache). It stops at the size cap
(``LLM_NB_MAX_DOWNLOAD``), before the disk fills (``LLM_NB_MIN_FREE_DISK`` stays
free), after ``LLM_NB_COPY_STALL`` seconds without a byte, and at once when
cancelled; each way its partial file is removed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import Settings, format_bytes
from ...errors import LlmNbError
from .sources import Planned, not_regular, plan_copy, safe_rel

CHUNK = 1024 * 1024
PROGRESS_EVERY_S = 0.2
Progress = Callable[[dict], None]


@dataclass
class CopyLimits:
    max_bytes: int
    min_free: int
    stall_s: float  # <= 0: never

    @classmethod
    def from_settings(cls, settings: Settings) -> CopyLimits:
        return cls(settings.max_download, settings.min_free_disk, settings.copy_stall)


def _open_local(path: str):
    """Open for reading without blocking, and only if it is still a regular file (it may have been swapped)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
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
        todo: list[tuple[Planned, Path, bool]] = []
        for item in planned:
            dest = (root / item.rel).resolve()
            if not dest.is_relative_to(root):  # a symlink inside the target pointing out of it
                safe_rel("../" + item.rel, item.source)
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

    def _copy_one(self, item: Planned, dest: Path, done_before: int) -> int:
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
