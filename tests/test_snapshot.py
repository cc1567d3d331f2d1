"""The memory store's directory kept across a restart of the router (stores/snapshot.py).

The case it is for: the router restarts while an instance restores its accounts (a host
reboot, both restarting). A router that starts knowing nobody answers a send for a
restoring session with a fast 404; one that read its snapshot waits for the session and
sends it once it is back, as a router that kept running would have."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from wa_router.app import Router
from wa_router.config import InstanceConfig
from wa_router.pool import Pool
from wa_router.sim import SimInstance
from wa_router.stores import MemoryStore
from wa_router.stores.base import Entry, Source, Status
from wa_router.stores.snapshot import VERSION, Snapshot, decode, encode

from .conftest import StartRouter, pool_config, send_body, sends, wait_for

SEND = "/api/messages/send"
TOKEN = "a-token-of-16-chars-or-more"
NAMES = ("node-0", "node-1")


NOW = 1800000000.0  # the start reading the file


def doc(entries: list[Any], drained: list[Any] | None = None, **extra: Any) -> bytes:
    return orjson.dumps(
        {"version": VERSION, "written_at": NOW - 10, "drained": drained or [], "entries": entries}
        | extra
    )


# -- the file's contents: a table ------------------------------------------------------------

GOOD = ["s1", "node-1", 1700000000.5, "webhook", "connected"]


@pytest.mark.parametrize(
    ("row", "kept"),
    [
        (GOOD, True),
        (["s1", None, 1700000000, "sync", None], True),  # a tombstone keeps late news out
        (["s1", "node-1", 1700000000, "placement", None], True),  # status not known
        (["s1", "node-9", 1700000000, "sync", "connected"], False),  # no longer in the pool
        (["", "node-1", 1700000000, "sync", "connected"], False),  # no session
        ([7, "node-1", 1700000000, "sync", "connected"], False),
        (["s1", "node-1", "yesterday", "sync", "connected"], False),
        (["s1", "node-1", True, "sync", "connected"], False),  # a bool is not a time
        (["s1", "node-1", 1700000000, "gossip", "connected"], False),  # unknown source
        (["s1", "node-1", 1700000000, "sync", "asleep"], False),  # unknown status
        (["s1", "node-1", 1700000000, "sync"], False),  # a field short
        ({"s1": "node-1"}, False),
        (None, False),
        (["s1", ["node-1"], 1700000000, "sync", "connected"], False),  # not a name
        (["s1", "node-1", 1700000000, ["sync"], "connected"], False),
        (["s1", "node-1", 1700000000, "sync", {}], False),
    ],
)
def test_a_row_is_kept_only_when_whole_and_for_this_pool(row: Any, kept: bool) -> None:
    got = decode(doc([row, [*GOOD[:1], "node-0", *GOOD[2:]]]), NAMES, NOW)
    assert len(got.entries) == (2 if kept else 1)
    assert got.skipped == (0 if kept else 1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b"[]",
        orjson.dumps({"version": VERSION + 1, "drained": [], "entries": []}),
        orjson.dumps({"drained": [], "entries": []}),
        orjson.dumps({"version": VERSION, "drained": [], "entries": {}}),
        orjson.dumps({"version": VERSION, "entries": []}),
        orjson.dumps({"version": VERSION, "drained": [], "entries": []}),  # no written_at
        orjson.dumps({"version": VERSION, "written_at": "now", "drained": [], "entries": []}),
    ],
)
def test_a_file_that_is_not_a_snapshot_of_this_version_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode(data, NAMES, NOW)


def test_nothing_read_back_is_newer_than_the_file_or_the_clock() -> None:
    # A reboot with the clock behind (no NTP yet): otherwise every webhook, sync and
    # demotion would be older than the restored entries, and refused.
    rows = [["s1", "node-1", NOW + 3600, "webhook", "connected"], GOOD]
    for written_at, now, first in [
        (NOW + 3600, NOW, NOW),  # clock behind: nothing newer than now
        (NOW - 60, NOW, NOW - 60),  # written a minute ago: nothing newer than the file
    ]:
        got = decode(doc(rows, written_at=written_at), NAMES, now)
        assert [e.observed_at for _, e in got.entries] == [first, GOOD[2]]


def test_what_is_written_reads_back_the_same() -> None:
    entries = [
        ("s1", Entry("node-1", 1700000000.25, Source.WEBHOOK, Status.CONNECTED)),
        ("s2", Entry(None, 1700000001.0, Source.SYNC)),
        ("s3", Entry("node-0", 1700000002.0, Source.PLACEMENT)),
    ]
    got = decode(encode(entries, ["node-1", "node-7"], 1700000003.0), NAMES, NOW)
    assert got.entries == entries
    assert got.drained == ["node-1"]  # node-7 left the pool
    assert got.skipped == 0


async def test_a_save_writes_only_what_changed_and_a_bad_path_is_not_fatal(tmp_path: Path) -> None:
    store = MemoryStore()
    snap = Snapshot(store, tmp_path / "state" / "directory.json", 60.0, NAMES)
    assert await snap.save()  # the first: the file says "empty", not "never written"
    assert not await snap.save()  # nothing changed
    await store.put("s1", Entry("node-1", 1700000000.0, Source.SYNC, Status.CONNECTED))
    assert await snap.save()
    assert [s for s, _ in decode(snap.path.read_bytes(), NAMES, NOW).entries] == ["s1"]
    assert not list(snap.path.parent.glob("*.tmp"))  # renamed into place, nothing left over

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    bad = Snapshot(store, blocked / "directory.json", 60.0, NAMES)  # its dir is a file
    assert not await bad.save()  # said in the log; the router goes on


async def test_a_save_at_the_stop_waits_for_a_write_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic save is cancelled at the stop while its write runs in a thread (which a
    cancel cannot stop); the stop's own save must land after it, never under it."""
    from wa_router.stores import snapshot

    started, first_done = threading.Event(), threading.Event()
    real_write = snapshot._write

    def slow_write(path: Path, data: bytes) -> None:
        if started.is_set():  # the next writes: at once
            real_write(path, data)
            return
        started.set()
        # A disk slow for a second: a write that does not wait for this one lands first.
        threading.Event().wait(1.0)
        real_write(path, data)
        first_done.set()

    store = MemoryStore()
    snap = Snapshot(store, tmp_path / "directory.json", 60.0, NAMES)
    await store.put("s1", Entry("node-1", 1700000000.0, Source.SYNC, Status.CONNECTED))
    monkeypatch.setattr(snapshot, "_write", slow_write)
    periodic = asyncio.ensure_future(snap.save())
    await wait_for(started.is_set, 5, "the first write running in its thread")
    periodic.cancel()
    await store.put("s2", Entry("node-0", 1700000001.0, Source.SYNC, Status.CONNECTED))
    assert await snap.save()  # waits for the write in flight, then writes its own
    await wait_for(first_done.is_set, 5, "the first write over")
    got = decode(snap.path.read_bytes(), NAMES, time.time())
    assert sorted(s for s, _ in got.entries) == ["s1", "s2"]
    assert os.listdir(tmp_path) == ["directory.json"]  # no temp file left over


# -- the router restarted while an instance restores --------------------------------------


def config(sims: list[SimInstance], state: Path, **state_extra: Any) -> Any:
    return pool_config(
        sims,
        state={"dir": str(state), **state_extra},
        admin={"token": TOKEN},
        health={"interval_s": 0.2, "down_interval_s": 0.1, "timeout_s": 0.5},
        # The watcher of parked sessions asks the pool often: there are no webhooks here.
        parking={"max_wait_s": 10.0},
        sync={"interval_s": 3600},
    )


Client = TestClient[web.Request, web.Application]


async def warm_router(start_router: StartRouter, cfg: Any) -> tuple[Client, Router]:
    client, router = await start_router(cfg)
    await wait_for(lambda: router.warm, 10, "the router's first sync")
    return client, router


async def reboot(
    start_router: StartRouter, sims: list[SimInstance], cfg: Any
) -> tuple[Client, Router]:
    """A router that knew s1 on node-1 stops; node-1 restarts without it (restoring, its
    login not back yet); a new router starts on the same state dir."""
    sims[1].add_session("s1")
    client, _ = await warm_router(start_router, cfg)
    assert (await client.post(SEND, json=send_body("s1"))).status == 200
    await client.close()  # the stop writes the snapshot (when it is on)
    await sims[1].restart()
    return await warm_router(start_router, cfg)


async def test_a_restarted_router_waits_for_a_session_still_restoring(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    cfg = config(sims, tmp_path / "state")
    client, router = await reboot(start_router, sims, cfg)
    assert router.directory.store is not None
    pending = client.post(SEND, json=send_body("s1", "after the reboot"))
    task = asyncio.ensure_future(pending)
    await wait_for(lambda: router.parking.parked > 0, 5, "the send parked for s1")
    sent_before = sends(sims[1])
    sims[1].add_session("s1")  # its restore logged it back in
    resp = await task
    assert resp.status == 200, await resp.text()
    assert sends(sims[1]) == sent_before + 1  # sent once, where the session is
    assert all(sends(s) == 0 for s in (sims[0], sims[2], sims[3]))


async def test_without_the_snapshot_the_same_send_is_a_fast_404(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    # The contrast: what the snapshot is for.
    cfg = config(sims, tmp_path / "state", directory_snapshot_s=None)
    client, _ = await reboot(start_router, sims, cfg)
    resp = await client.post(SEND, json=send_body("s1"))
    assert resp.status == 404
    assert (await resp.json())["error"] == "session_not_found"
    assert not (tmp_path / "state" / "directory.json").exists()


async def test_a_drained_instance_stays_drained_across_a_restart(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    cfg = config(sims, tmp_path / "state")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client, _ = await warm_router(start_router, cfg)
    assert (await client.post("/admin/instances/node-2/drain", headers=auth)).status == 200
    await client.close()
    client, _ = await warm_router(start_router, cfg)
    status = await (await client.get("/admin/status", headers=auth)).json()
    drained = {i["name"]: i["draining"] for i in status["instances"]}
    assert drained == {"node-0": False, "node-1": False, "node-2": True, "node-3": False}


async def test_an_unreadable_snapshot_is_logged_and_the_router_starts_empty(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "directory.json").write_bytes(b'{"version": 1, "entries": [["s1", "node-1"')
    sims[1].add_session("s1")
    with capture_logs() as logs:
        client, _ = await warm_router(start_router, config(sims, state))
    assert [e["event"] for e in logs if "snapshot" in e["event"]] == [
        "directory_snapshot_unreadable"
    ]
    # Nothing was believed: the session is found where it is, as with no file at all.
    assert (await client.post(SEND, json=send_body("s1"))).status == 200
    await client.close()
    got = decode((state / "directory.json").read_bytes(), NAMES, time.time())
    assert [s for s, _ in got.entries] == ["s1"]


@pytest.mark.parametrize(
    ("uptime_s", "seen_back_before", "recently_back"),
    [
        (3.0, False, True),  # young: restoring, though this router never saw it go
        (3600.0, False, False),  # up for an hour: long done restoring
        (3.0, True, False),  # seen back long ago: its own account, not overwritten
        (-5.0, False, False),  # nonsense: not taken for a restart
    ],
)
def test_the_first_uptime_seen_says_when_an_instance_came_back(
    uptime_s: float, seen_back_before: bool, recently_back: bool
) -> None:
    now = [1000.0]
    pool = Pool([InstanceConfig("node-0", "http://127.0.0.1:3001")], clock=lambda: now[0])
    (inst,) = pool.instances
    if seen_back_before:
        pool.mark_back(inst, "test")
        now[0] += 600.0
    pool.note_uptime(inst, uptime_s)
    assert pool.recently_back(inst, 60.0) is recently_back
