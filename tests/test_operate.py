"""Operating it: active health checks, sync at start and on demand, recovery resync."""

from __future__ import annotations

import pytest

from wa_router.sim import SimInstance
from wa_router.stores import Source
from wa_router.stores.base import Status

from .conftest import API_KEY, StartRouter, pool_config, send_body, sends, wait_for


def ops_config(sims: list[SimInstance], **extra: object) -> object:
    return pool_config(
        sims, upstream={"api_key": API_KEY}, health={"interval_s": 0.1, "timeout_s": 0.5}, **extra
    )


async def test_idle_instance_that_dies_is_down_within_two_intervals_and_sync_moves_its_sessions(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[2].add_session("idle1")
    sims[2].add_session("idle2")
    client, router = await start_router(ops_config(sims, sync={"interval_s": 3600}))
    await wait_for(lambda: router.warm, what="the warm sync")
    assert (await router.directory.lookup("idle1")).instance == "node-2"  # type: ignore[union-attr]
    inst = router.pool.get("node-2")
    assert inst is not None
    await sims[2].stop()
    rounds = router.health.rounds
    await wait_for(lambda: inst.state.value == "down", what="node-2 marked down")
    assert router.health.rounds - rounds <= 2  # no traffic: the checks alone saw it
    # Its sessions come back up elsewhere (Node restores them); the next sync moves them.
    await sims[2].start()  # same port, sessions gone with the crash
    sims[2].unhealthy = True  # ...and not healthy yet, so still down
    sims[0].add_session("idle1")
    sims[3].add_session("idle2")
    report = await router.syncer.run()
    assert sorted(report.fixed) == [("idle1", "node-2", "node-0"), ("idle2", "node-2", "node-3")]
    assert report.instances["node-2"].startswith("skipped")
    scans = router.discovery.stats.scans
    for s in ("idle1", "idle2"):
        assert (await client.post("/api/messages/send", json=send_body(s))).status == 200
    assert router.discovery.stats.scans == scans  # the sync said where: no rediscovery
    assert sends(sims[0]) == 1 and sends(sims[3]) == 1


async def test_recovered_instance_is_synced_at_once(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await start_router(ops_config(sims, sync={"interval_s": 3600}))
    await wait_for(lambda: router.warm)
    inst = router.pool.get("node-1")
    assert inst is not None
    await sims[1].stop()
    await wait_for(lambda: inst.state.value == "down")
    runs = router.syncer.runs
    await sims[1].start()
    sims[1].add_session("back1")  # restored while the router saw it down
    await wait_for(lambda: inst.state.value == "healthy", what="node-1 back")
    await wait_for(lambda: router.syncer.runs > runs, what="the recovery sync")
    entry = await router.directory.lookup("back1")
    assert entry is not None and entry.instance == "node-1" and entry.source is Source.SYNC


async def test_warm_sync_learns_every_session_before_ready(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    for i in range(20):
        sims[i % 4].add_session(f"w{i}")
    client, router = await start_router(ops_config(sims))
    await wait_for(lambda: router.warm)
    assert await router.directory.counts() == {f"node-{n}": 5 for n in range(4)}
    scans = router.discovery.stats.scans
    for i in range(20):
        assert (await client.post("/api/messages/send", json=send_body(f"w{i}"))).status == 200
    assert router.discovery.stats.scans == scans


async def test_sync_reports_lost_duplicated_and_dry_run_changes_nothing(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await start_router(ops_config(sims, sync={"interval_s": 3600}))
    await wait_for(lambda: router.warm)
    await router.directory.observe("gone", "node-3", Source.ADMIN)
    sims[0].add_session("twice", status="connected")
    sims[1].add_session("twice", status="qr_scanning")
    sims[2].add_session("moved")
    await router.directory.observe("moved", "node-1", Source.ADMIN, observed_at=1.0)
    before = {s: await router.directory.store.get(s) for s in ("gone", "twice", "moved")}
    dry = await router.syncer.run(dry_run=True)
    assert dry.lost == [("gone", "node-3")]
    assert dry.duplicated == [("twice", "node-0", ["node-1"])]
    assert dry.fixed == [("moved", "node-1", "node-2")]
    assert not dry.ok
    assert {s: await router.directory.store.get(s) for s in before} == before
    assert dry.lines()[-1] == "Summary: 2 updated, 0 verified, 1 lost, 1 duplicated (dry run)"
    real = await router.syncer.run()
    assert (await router.directory.lookup("moved")).instance == "node-2"  # type: ignore[union-attr]
    assert (await router.directory.lookup("twice")).instance == "node-0"  # type: ignore[union-attr]
    assert "Fixed: moved (node-1 -> node-2)" in real.lines()


async def test_sync_without_the_node_key_says_so(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await start_router(pool_config(sims, sync={"interval_s": 3600}))
    await wait_for(lambda: router.warm)
    report = await router.syncer.run()
    assert all("set upstream.api_key" in v for v in report.instances.values())


@pytest.mark.parametrize("status", ["connected", "qr_scanning"])
async def test_most_recently_connected_duplicate_is_kept(
    sims: list[SimInstance], start_router: StartRouter, status: str
) -> None:
    client, router = await start_router(ops_config(sims, sync={"interval_s": 3600}))
    await wait_for(lambda: router.warm)
    old = sims[0].add_session("d", status=status)
    new = sims[3].add_session("d", status=status)
    old.connected_at = "2026-11-30T01:00:00.000Z"
    new.connected_at = "2026-11-30T02:00:00.000Z"
    report = await router.syncer.run()
    assert report.duplicated == [("d", "node-3", ["node-0"])]


async def test_sync_does_not_learn_a_listed_session_id_no_request_may_name(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """An instance lists an id a request naming it would get a 400 for (as a webhook's,
    it is never put in the directory); the rest of the listing is learned as usual."""
    sims[0].add_session("good1")
    sims[0].add_session("a/b")
    sims[1].add_session("s" * 300)
    client, router = await start_router(ops_config(sims, sync={"interval_s": 3600}))
    await wait_for(lambda: router.warm, what="the warm sync")
    report = await router.syncer.run()
    assert report.refused_ids == 2 and report.to_json()["refused_ids"] == 2
    assert "Refused: 2 listed session ids no request may name" in report.lines()
    assert await router.directory.lookup("a/b") is None
    assert await router.directory.lookup("s" * 300) is None
    assert (await router.directory.lookup("good1")).instance == "node-0"  # type: ignore[union-attr]
    # One learned before a reload tightened the policy: still listed, so neither "lost"
    # (a false alarm for cron) nor "gone" after its instance's restart; never learned anew.
    assert await router.directory.observe("a/b", "node-0", Source.SYNC, status=Status.CONNECTED)
    report = await router.syncer.run()
    assert report.ok and not report.lost and report.refused_ids == 2, report.lines()
    report = await router.syncer.run(only=router.pool.get("node-0"))
    assert not report.gone, report.lines()
    assert all("a/b" not in line for line in report.lines())
    # Listed elsewhere now than where the directory had it: not lost either.
    del sims[0].sessions["a/b"]
    sims[2].add_session("a/b")
    report = await router.syncer.run()
    assert report.ok and not report.lost, report.lines()
