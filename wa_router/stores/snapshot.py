"""The memory store's directory, kept across a restart of the router: a file in state.dir.

With the memory store a router forgets every owner when it stops. Started again while the
pool restores (a host reboot: every instance restarting, the router up first), it would
know nobody's session, and a send for one still restoring would get a fast 404
`session_not_found`: a failed send. With the file it knows whose each session was; its
owner is down or restarted, so the send waits for it (parking) as it would have had the
router kept running.

Written every `interval_s` while the directory changed and once more at the stop, to a temp
file that is fsynced and renamed over the old one (a crash leaves one of them whole);
read at the start. Every entry keeps its observation time, so whatever is learned later
(webhooks, sync, discovery) replaces it by the rule that always applies (`may_replace`).
A file that cannot be read is said so in the log and the router starts empty, as it would
without one; entries naming an instance the config no longer has are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from .base import Entry, Source, Status
from .memory import MemoryStore

log = structlog.get_logger("wa_router.snapshot")

VERSION = 1
_SOURCES = frozenset(s.value for s in Source)
_STATUSES = frozenset(s.value for s in Status)


@dataclass(frozen=True, slots=True)
class Contents:
    entries: list[tuple[str, Entry]]
    drained: list[str]  # instances an operator drained (admin API)
    skipped: int  # rows left out: malformed, or naming an instance the config lacks


def encode(
    entries: Iterable[tuple[str, Entry]], drained: Iterable[str], written_at: float
) -> bytes:
    rows = [
        [session, e.instance, e.observed_at, e.source.value, e.status] for session, e in entries
    ]
    doc = {"version": VERSION, "written_at": written_at, "drained": sorted(drained)}
    return orjson.dumps({**doc, "entries": rows})


def decode(data: bytes, instances: Collection[str], now: float) -> Contents:
    """What a snapshot holds, less what is not for this pool. ValueError when the file is
    not a snapshot of this version at all.

    No observation is taken as newer than the file, nor than `now`: a clock that is behind
    after a reboot (no NTP yet) would otherwise make the restored entries newer than all
    that is learned next, and so keep them."""
    doc = orjson.loads(data)
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError("not a directory snapshot of this version")
    rows, drained, written_at = doc.get("entries"), doc.get("drained"), doc.get("written_at")
    if not isinstance(rows, list) or not isinstance(drained, list):
        raise ValueError("no entries")
    if not isinstance(written_at, int | float) or isinstance(written_at, bool):
        raise ValueError("no time of writing")
    ceiling = min(float(written_at), now)
    out: list[tuple[str, Entry]] = []
    for row in rows:
        entry = _entry(row, instances, ceiling)
        if entry is not None:
            out.append(entry)
    kept = [name for name in drained if isinstance(name, str) and name in instances]
    return Contents(out, kept, len(rows) - len(out))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _entry(row: Any, instances: Collection[str], ceiling: float) -> tuple[str, Entry] | None:
    if not (isinstance(row, list) and len(row) == 5):
        return None
    session, instance, observed_at, source, status = row
    if not (isinstance(session, str) and session):
        return None
    if instance is not None and not (isinstance(instance, str) and instance in instances):
        return None  # removed from the pool: nothing to route there
    if not _number(observed_at):
        return None
    if not (isinstance(source, str) and source in _SOURCES):
        return None
    if status is not None and not (isinstance(status, str) and status in _STATUSES):
        return None
    when = min(float(observed_at), ceiling)
    return session, Entry(instance, when, Source(source), status)


def _write(path: Path, data: bytes) -> None:
    # A name of its own: a write still running in a thread never shares a temp file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself survives a power cut only once the directory is synced too.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Snapshot:
    """Loads the directory into `store` at the start and keeps the file up to date."""

    def __init__(
        self, store: MemoryStore, path: Path, interval_s: float, instances: Collection[str]
    ) -> None:
        self._store = store
        self._path = path
        self._interval_s = interval_s
        self._instances = frozenset(instances)
        self._written = -1  # `store.changes` when the file was last written
        # The write running in a thread: a save waits for it, so no older write can land
        # after a newer one (a cancelled loop's thread goes on; the stop's save comes next).
        self._writing: asyncio.Future[None] | None = None

    @property
    def path(self) -> Path:
        return self._path

    async def load(self) -> int:
        """The entries read back into the (empty) store; 0 with no file or a bad one."""
        try:
            data = await asyncio.to_thread(self._path.read_bytes)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("directory_snapshot_unreadable", path=str(self._path), error=repr(exc))
            return 0
        try:
            got = decode(data, self._instances, time.time())
        except Exception as exc:  # whatever is wrong with it, the router starts
            log.warning(
                "directory_snapshot_unreadable", path=str(self._path), error=type(exc).__name__
            )
            return 0
        stored = sum(await self._store.put_many(got.entries))
        for name in got.drained:
            await self._store.set_draining(name, True)
        self._written = self._store.changes  # what is in the file now
        log.info(
            "directory_snapshot_loaded", entries=stored, drained=got.drained, skipped=got.skipped
        )
        return stored

    async def save(self) -> bool:
        """Write the directory if it changed since the last write; False if it did not or
        the write failed (said in the log: the router goes on, the next write retries)."""
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writing)
        changes = self._store.changes
        if changes == self._written:
            return False
        entries, drained = self._store.entries(), await self._store.drained()
        self._writing = writing = asyncio.ensure_future(
            asyncio.to_thread(self._encode_and_write, entries, drained, time.time())
        )
        try:
            await asyncio.shield(writing)
        except OSError as exc:
            log.warning("directory_snapshot_failed", path=str(self._path), error=repr(exc))
            return False
        finally:
            if writing.done() and self._writing is writing:
                self._writing = None
        self._written = changes
        return True

    def _encode_and_write(
        self, entries: list[tuple[str, Entry]], drained: set[str], written_at: float
    ) -> None:
        """In a thread: a big directory's encoding would stall the loop (~0.1 s at 100k)."""
        data = encode(entries, drained, written_at)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        _write(self._path, data)

    async def run(self) -> None:
        """Every `interval_s`, while the router runs."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.save()


__all__ = ["VERSION", "Contents", "Snapshot", "decode", "encode"]
