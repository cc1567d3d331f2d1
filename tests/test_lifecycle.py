"""The `wa-router` command as a real process: graceful shutdown, bounded grace, the demo,
check-config. Simulated instances run in the test's event loop; the router is a subprocess
on a loopback port, driven by signals as an init system or a container runtime drives it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from wa_router.sim import SimInstance

from .conftest import API_KEY, free_port, send_body, wait_for, wait_until

ROOT = Path(__file__).resolve().parent.parent
# A message text that cannot appear in logs by chance: finding it there means a leak.
SECRET_TEXT = "lifecycle-secret-text-5d1c9e"
DEMO_KEY = "demo-key"
SEND = "/api/messages/send"


# -- process helpers -------------------------------------------------------------------------


def cli_command(*args: str) -> list[str]:
    """The console script when it is installed, else the module (same entry point)."""
    script = shutil.which("wa-router")
    if script is not None:
        return [script, *args]
    return [sys.executable, "-m", "wa_router.cli", *args]


async def spawn(
    argv: Sequence[str], *, stdout: Any, stderr: Any, cwd: Path = ROOT
) -> asyncio.subprocess.Process:
    # The repo's package whatever the working directory (`python -m` looks there first).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
    )


async def wait_exit(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"process {proc.pid} still running after {timeout_s} s") from None


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Never leave a process behind: terminate, then kill after a deadline."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def router_process(
    cfg: Path, logs: Path, *extra: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`wa-router serve -c cfg [extra]`, stdout and stderr in `logs`.out/.err."""
    with (
        logs.with_suffix(".out").open("wb") as out,
        logs.with_suffix(".err").open("wb") as err,
    ):
        proc = await spawn(
            [sys.executable, "-m", "wa_router.cli", "serve", "-c", str(cfg), *extra],
            stdout=out,
            stderr=err,
            # Beside its config: a config without state.dir keeps ./state there, not in
            # the repo (the directory snapshot is written at every stop).
            cwd=cfg.parent,
        )
        try:
            yield proc
        finally:
            await reap(proc)


def output_of(logs: Path) -> str:
    return "".join(logs.with_suffix(ext).read_text(errors="replace") for ext in (".out", ".err"))


def write_config(
    tmp_path: Path, sims: list[SimInstance], port: int, grace_s: float, front: str = "lean"
) -> Path:
    raw = {
        "instances": [{"name": s.name, "url": s.url} for s in sims],
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": grace_s, "front": front},
        "state": {"dir": str(tmp_path / "state")},  # its directory snapshot, not the repo's
    }
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def wait_healthy(
    proc: asyncio.subprocess.Process, base: str, logs: Path | None = None, timeout_s: float = 20.0
) -> dict[str, Any]:
    """Poll GET /health until 200; fail at once if the process died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while True:
            if proc.returncode is not None:
                out = output_of(logs) if logs is not None else ""
                raise AssertionError(f"router exited with {proc.returncode} before serving\n{out}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{base}/health") as resp:
                    if resp.status == 200:
                        doc: dict[str, Any] = await resp.json()
                        return doc
            if loop.time() > deadline:
                raise AssertionError(f"{base}/health did not answer 200 within {timeout_s} s")
            await asyncio.sleep(0.05)


async def wait_refused(base: str, timeout_s: float) -> None:
    """Poll new connections (never reused) until one is refused."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    timeout = aiohttp.ClientTimeout(total=1.0)
    while True:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            try:
                async with http.get(f"{base}/health") as resp:
                    await resp.read()
            except aiohttp.ClientConnectorError:
                return
            except (aiohttp.ClientError, TimeoutError):
                pass  # accepted just before the listener closed: try again
        if loop.time() > deadline:
            raise AssertionError(f"{base} still accepts connections after {timeout_s} s")
        await asyncio.sleep(0.01)


def consecutive_free_ports(n: int, attempts: int = 20) -> int:
    """The first of `n` consecutive loopback ports that are free now."""
    for _ in range(attempts):
        base = random.randint(20000, 40000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        else:
            return base
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} consecutive free ports found in {attempts} attempts")


@pytest.fixture
async def two_sims() -> AsyncIterator[list[SimInstance]]:
    nodes = [SimInstance(name=f"node-{i}", api_key=API_KEY, ready_delay_s=0.05) for i in range(2)]
    try:
        for n in nodes:
            await n.start()
        yield nodes
    finally:
        for n in nodes:
            with contextlib.suppress(Exception):
                await n.stop()


# -- serve: graceful shutdown ----------------------------------------------------------------


@pytest.mark.parametrize("front", ["lean", "aiohttp"])
async def test_sigterm_finishes_in_flight_request_and_refuses_new_connections(
    tmp_path: Path, two_sims: list[SimInstance], front: str
) -> None:
    """The answer in flight at SIGTERM comes whole, and says the connection ends with it."""
    sim = two_sims[0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path, two_sims, port, grace_s=10, front=front)
    logs = tmp_path / "router"
    async with router_process(cfg, logs) as proc:
        health = await wait_healthy(proc, base, logs)
        assert health["healthy_instances"] == 2

        sim.add_session("s1")
        sim.route_delay_s = {SEND: 1.5}
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:

            async def send() -> tuple[int, dict[str, Any], str]:
                async with http.post(f"{base}{SEND}", json=send_body("s1", SECRET_TEXT)) as r:
                    return r.status, await r.json(), r.headers.get("Connection", "")

            in_flight = asyncio.create_task(send())
            try:
                await wait_for(lambda: sim.count("POST", SEND) == 1, 10, "the send at the sim")
                proc.send_signal(signal.SIGTERM)
                signalled = loop.time()

                # The listener closes first; the request in flight is still being served.
                await wait_refused(base, timeout_s=1.0)
                assert not in_flight.done(), "in-flight request ended before the listener closed"

                status, doc, connection = await asyncio.wait_for(in_flight, 10)
            finally:
                if not in_flight.done():
                    in_flight.cancel()
                    with contextlib.suppress(BaseException):
                        await in_flight
        assert status == 200, doc
        assert doc.get("success") is True
        assert doc.get("message_id")
        assert connection.lower() == "close"

        code = await wait_exit(proc, 10)
        assert code == 0, output_of(logs)
        assert loop.time() - signalled < 10
        assert sim.count("POST", SEND) == 1  # not re-sent

    out = output_of(logs)
    assert "router_listening" in out  # the logs were captured: the checks below mean something
    assert API_KEY not in out
    assert SECRET_TEXT not in out


async def test_sigterm_grace_is_bounded_when_instance_hangs(
    tmp_path: Path, two_sims: list[SimInstance]
) -> None:
    sim = two_sims[0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path, two_sims, port, grace_s=1)
    logs = tmp_path / "router"
    async with router_process(cfg, logs) as proc:
        await wait_healthy(proc, base, logs)
        sim.add_session("s1")
        loop = asyncio.get_running_loop()
        # The client's own timeout is far above the grace: hitting it would mean a hang.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=8)) as http:
            # The router learns the owner first: a hung instance also hangs discovery probes.
            status_url = f"{base}/api/sessions/s1/status?api_key={API_KEY}"
            async with http.get(status_url) as r:
                assert r.status == 200, await r.text()
            sim.hang = True

            async def send() -> tuple[int, bytes]:
                async with http.post(f"{base}{SEND}", json=send_body("s1", SECRET_TEXT)) as r:
                    return r.status, await r.read()

            hung = asyncio.create_task(send())
            try:
                await wait_for(lambda: sim.count("POST", SEND) == 1, 10, "the send at the sim")
                proc.send_signal(signal.SIGTERM)
                signalled = loop.time()
                code = await wait_exit(proc, 5)
                exited_after = loop.time() - signalled

                outcome: tuple[int, bytes] | BaseException
                try:
                    outcome = await asyncio.wait_for(hung, 5)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = exc
            finally:
                if not hung.done():
                    hung.cancel()
                    with contextlib.suppress(BaseException):
                        await hung

        assert code == 0, output_of(logs)
        # Waited for the grace, then cancelled what was left: not twice the grace (aiohttp's
        # own shutdown_timeout would apply it twice; the router's drain applies it once).
        assert 0.9 < exited_after < 1.9 + 1.0, exited_after
        # An answer that says what happened, not a connection closed without a word.
        assert isinstance(outcome, tuple), repr(outcome)
        status, body = outcome
        assert status == 503 and b'"error":"shutting_down"' in body, outcome
        assert sim.count("POST", SEND) == 1

    out = output_of(logs)
    assert API_KEY not in out
    assert SECRET_TEXT not in out


# -- demo --------------------------------------------------------------------------------------


async def read_until(stream: asyncio.StreamReader, marker: str, timeout_s: float) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen: list[str] = []
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"no {marker!r} in {timeout_s} s; got:\n{''.join(seen)}")
        try:
            line = await asyncio.wait_for(stream.readline(), remaining)
        except TimeoutError:
            continue
        if not line:
            raise AssertionError(f"output ended before {marker!r}; got:\n{''.join(seen)}")
        seen.append(line.decode(errors="replace"))
        if marker in seen[-1]:
            return "".join(seen)


async def test_demo_serves_the_documented_requests_and_stops_on_sigint(tmp_path: Path) -> None:
    instance_port = consecutive_free_ports(4)
    port = free_port()
    while instance_port <= port < instance_port + 4:
        port = free_port()
    base = f"http://127.0.0.1:{port}"
    err_path = tmp_path / "demo.err"
    with err_path.open("wb") as err:
        proc = await spawn(
            cli_command("demo", "--port", str(port), "--instance-port", str(instance_port)),
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
        try:
            assert proc.stdout is not None
            text = await read_until(proc.stdout, "Ctrl-C", 20)
            assert f"{base}{SEND}" in text
            assert f"ports {instance_port}-{instance_port + 3}" in text

            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                async with http.get(f"{base}/health") as r:
                    assert r.status == 200
                    health = await r.json()
                assert health["healthy_instances"] == 4, health
                assert all(i["healthy"] for i in health["instances"].values()), health
                # The admin API is on with the token it printed; its sync lists every
                # instance (it has their key), so a cron job would see exit 0.
                token = re.search(r"admin token: (\S+)\)", text)
                assert token is not None, text
                auth = {"Authorization": f"Bearer {token.group(1)}"}
                async with http.post(f"{base}/admin/sync", headers=auth) as r:
                    assert r.status == 200
                    report = await r.json()
                assert set(report["instances"].values()) == {"ok"}, report
                async with http.get(f"{base}/admin/") as r:
                    assert r.status == 200 and r.content_type == "text/html"
                assert f"{base}/metrics" in text

                body = {
                    "session_id": "demo-3",
                    "workspace_id": 1,
                    "recipient_phone": "628123456789",
                    "message": "hi",
                    "type": "text",
                    "api_key": DEMO_KEY,
                }
                async with http.post(f"{base}{SEND}", json=body) as r:
                    doc = await r.json()
                    assert r.status == 200, doc
                assert doc.get("message_id"), doc

                create = {"session_id": "my-session", "workspace_id": 1, "api_key": DEMO_KEY}
                async with http.post(f"{base}/api/sessions", json=create) as r:
                    doc = await r.json()
                    assert r.status == 200, doc

                status_url = f"{base}/api/sessions/my-session/status?api_key={DEMO_KEY}"
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                last: Any = None
                while True:
                    async with http.get(status_url) as r:
                        last = (r.status, await r.json())
                    if last[0] == 200 and last[1].get("status") == "connected":
                        break
                    assert loop.time() < deadline, f"my-session never connected: {last}"
                    await asyncio.sleep(0.05)

                bad = URL(f"{base}/api/sessions/..%2Fetc/status?api_key={DEMO_KEY}", encoded=True)
                async with http.get(bad) as r:
                    doc = await r.json()
                    assert r.status == 400, doc
                    assert r.content_type == "application/json"
                assert doc.get("error") == "bad_request", doc

            proc.send_signal(signal.SIGINT)
            code = await wait_exit(proc, 10)
            assert code == 0, err_path.read_text(errors="replace")
        finally:
            await reap(proc)


# -- check-config ----------------------------------------------------------------------------


async def test_check_config_accepts_the_shipped_config() -> None:
    proc = await spawn(
        cli_command("check-config", "conf/router.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        await reap(proc)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert b"OK" in out


async def test_two_workers_share_the_port_and_stop_together(
    tmp_path: Path, two_sims: list[SimInstance]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path, two_sims, port, grace_s=2)
    logs = tmp_path / "router"
    two_sims[1].add_session("w")
    async with router_process(cfg, logs, "--workers", "2", "--loop", "asyncio") as proc:
        await wait_healthy(proc, base, logs)
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: both workers
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(40):
                async with http.post(f"{base}{SEND}", json=send_body("w")) as r:
                    assert r.status == 200
        await wait_for(lambda: "router_listening" in output_of(logs), 10, "worker logs")
        # Two processes share the log file, so lines may interleave: match, don't parse.
        text = output_of(logs)
        pids = {int(p) for p in re.findall(r'"pid": (\d+), "event": "router_listening"', text)}
        # Two listening workers, and both took requests (each found the session itself).
        assert len(pids) == 2, text
        assert text.count('"event": "session_rediscovered"') == 2, text
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 10) == 0
    assert two_sims[1].count("POST", SEND) == 40


async def test_sighup_reloads_the_config_under_load_and_keeps_serving(
    tmp_path: Path, two_sims: list[SimInstance]
) -> None:
    """logrotate and `systemctl reload` send SIGHUP: no request fails, a valid change is
    applied, a broken file is refused and the running config kept."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path, two_sims, port, grace_s=2)
    raw = yaml.safe_load(cfg.read_text())
    logs = tmp_path / "router"
    two_sims[0].add_session("h")
    statuses: list[int] = []
    stop = asyncio.Event()
    async with router_process(cfg, logs) as proc:
        await wait_healthy(proc, base, logs)
        async with aiohttp.ClientSession() as http:

            async def load() -> None:
                while not stop.is_set():
                    async with http.post(f"{base}{SEND}", json=send_body("h")) as r:
                        statuses.append(r.status)

            runner = asyncio.create_task(load())
            try:
                await wait_for(lambda: len(statuses) >= 20, 10, "load before")
                raw["log"] = {"level": "warning"}
                raw["discovery"] = {"probe_timeout_s": 1.5}  # built in: needs a restart
                cfg.write_text(yaml.safe_dump(raw))
                proc.send_signal(signal.SIGHUP)
                await wait_for(lambda: '"config_reloaded"' in output_of(logs), 10, "reload")
                n = len(statuses)
                await wait_for(lambda: len(statuses) >= n + 20, 10, "load after")
                # An instance added to the file is used: health-checked, its sessions found.
                extra = SimInstance(name="node-new", api_key=API_KEY, ready_delay_s=0.05)
                await extra.start()
                try:
                    extra.add_session("on-the-new-one")
                    raw["log"] = {"level": "info"}
                    raw["instances"].append({"name": extra.name, "url": extra.url})
                    cfg.write_text(yaml.safe_dump(raw))
                    proc.send_signal(signal.SIGHUP)
                    await wait_for(
                        lambda: '"instances_changed"' in output_of(logs), 10, "the new member"
                    )
                    send = f"{base}{SEND}"
                    async with http.post(send, json=send_body("on-the-new-one")) as r:
                        assert r.status == 200, await r.text()
                    assert extra.count("POST", SEND) == 1 and extra.count("GET", "/health") >= 1
                finally:
                    await extra.stop()
                # A drain kept in the file: on with one reload, off with the next.
                first = raw["instances"][0]["name"]
                for draining in (True, False):
                    raw["instances"][0]["drain"] = draining
                    cfg.write_text(yaml.safe_dump(raw))
                    proc.send_signal(signal.SIGHUP)
                    line = f'wa_router_instance_draining{{upstream="{first}"}} {float(draining)}'
                    await wait_until(
                        lambda line=line: metrics_has(http, base, line), 10, f"drain {draining}"
                    )
                cfg.write_text("instances: [oops")  # broken: refused, the old one kept
                proc.send_signal(signal.SIGHUP)
                await wait_for(lambda: "config_reload_refused" in output_of(logs), 10, "refusal")
                n = len(statuses)
                await wait_for(lambda: len(statuses) >= n + 20, 10, "load after the refusal")
            finally:
                stop.set()
                await runner
        assert proc.returncode is None  # still serving
    assert statuses and set(statuses) == {200}
    out = output_of(logs)
    lines = out.splitlines()
    reloaded = next(line for line in lines if '"config_reloaded"' in line)
    assert '"applied": ["log.level"]' in reloaded, reloaded
    assert '"needs_restart": ["discovery.probe_timeout_s"]' in reloaded, reloaded
    # The new level held until the next reload: no info lines in between.
    between = lines[
        lines.index(reloaded) + 1 : lines.index(
            next(x for x in lines if '"instances_changed"' in x)
        )
    ]
    assert not any('"level": "info"' in line for line in between if line.startswith("{")), between
    added = next(line for line in lines if '"instances_changed"' in line)
    assert '"added": ["node-new"]' in added, added


async def metrics_has(http: aiohttp.ClientSession, base: str, line: str) -> bool:
    async with http.get(f"{base}/metrics") as r:
        return line in (await r.text()).splitlines()


async def test_a_reload_asked_while_the_workers_start_is_applied_not_fatal(
    tmp_path: Path, two_sims: list[SimInstance]
) -> None:
    """SIGHUP as soon as both workers are listening, before they serve: its default action
    would end a worker; each applies it once it serves instead."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path, two_sims, port, grace_s=1)
    logs = tmp_path / "router"
    async with router_process(cfg, logs, "--workers", "2") as proc:
        await wait_for(
            lambda: output_of(logs).count('"router_listening"') == 2, 20, "both workers up"
        )
        proc.send_signal(signal.SIGHUP)
        await wait_for(
            lambda: output_of(logs).count('"config_reloaded"') == 2, 20, "both workers reloaded"
        )
        await wait_healthy(proc, base, logs)
        assert output_of(logs).count('"router_started"') == 2, output_of(logs)
        assert proc.returncode is None


async def test_workers_die_with_their_parent_however_it_dies(
    tmp_path: Path, two_sims: list[SimInstance]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path, two_sims, port, grace_s=1)
    logs = tmp_path / "router"
    async with router_process(cfg, logs, "--workers", "2", "--loop", "asyncio") as proc:
        await wait_healthy(proc, base, logs)
        proc.send_signal(signal.SIGHUP)  # forwarded to the workers, which reload
        await wait_for(
            lambda: output_of(logs).count('"config_reloaded"') == 2, 10, "both workers reloaded"
        )
        proc.send_signal(signal.SIGKILL)  # the parent only
        await proc.wait()
        await wait_refused(base, timeout_s=10)  # no worker left listening, orphaned


async def test_a_port_in_use_is_one_line_and_exit_2(
    tmp_path: Path, two_sims: list[SimInstance]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, two_sims, port, grace_s=1)
        for extra in ((), ("--workers", "2")):
            proc = await spawn(
                cli_command("serve", "-c", str(cfg), *extra),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 20)
            finally:
                await reap(proc)
            assert proc.returncode == 2
            lines = err.decode().strip().splitlines()
            assert lines == [
                f"wa-router: cannot listen on 127.0.0.1:{port}: the port is in use "
                "(change server.port, or WA_ROUTER_SERVER__PORT)"
            ], err.decode()
            assert b"router_started" not in out + err


MALFORMED = (
    # A request line that is not HTTP, carrying a key in its query.
    b"GET /api/sessions?api_key=KEY-IN-A-BROKEN-LINE HTTP/9.9 junk\r\n\r\n",
    # A header line without a colon, another key in it.
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Api-Key KEY-IN-A-BROKEN-HEADER\r\n\r\n",
    # Chunked framing that lies, the key in the body.
    b"POST /api/messages/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'zz\r\n{"api_key": "KEY-IN-A-BROKEN-BODY"}\r\n0\r\n\r\n',
    # Both Content-Length and Transfer-Encoding (a smuggling attempt).
    b"POST /api/messages/send?api_key=KEY-IN-A-SMUGGLE HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # A header far over the limit (limits.max_header_bytes, 32 KiB).
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"KEY-IN-A-HUGE-HEADER" * 2000 + b"\r\n\r\n",
)


async def test_every_log_line_is_json_and_none_quotes_a_malformed_request(
    tmp_path: Path, two_sims: list[SimInstance]
) -> None:
    import json

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path, two_sims, port, grace_s=1)
    raw = yaml.safe_load(cfg.read_text())
    raw["log"] = {"format": "json", "level": "debug"}
    cfg.write_text(yaml.safe_dump(raw))
    logs = tmp_path / "router"
    async with router_process(cfg, logs) as proc:
        await wait_healthy(proc, base, logs)
        for payload in MALFORMED:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(65536), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.") and b" 4" in answer[:13], answer[:80]
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 10) == 0
    text = output_of(logs)
    lines = [line for line in text.splitlines() if line.strip()]
    assert any('"router_stopped"' in line for line in lines)  # the whole run is here
    for line in lines:
        json.loads(line)  # one JSON object per line, whoever logged it
    assert "KEY-IN-A-" not in text
