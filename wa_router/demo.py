"""`wa-router demo`: four simulated Blazz instances, a simulated Laravel and the router,
in one process, wired as a real deployment is.

The embedded default: memory store, the Blazz profile, instances on 127.0.0.1:3001-3004
(the ports of `conf/router.yaml`). Node's LARAVEL_URL is the router, so webhooks and
`accounts/active` go through it to the simulated Laravel (the router's
`webhooks.laravel_url`). The demo sessions exist only as Laravel accounts with a saved
login in the shared session folder: on start every instance restores all of them, as
Blazz's PM2 pool does, and the demo waits until that race has settled (the last
`session_ready` wins; the others are dropped with reason CONFLICT) before it says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import signal
import sys
import tempfile

from aiohttp import web

from .app import RouterRunner, build_app
from .config import (
    AdminConfig,
    Config,
    InstanceConfig,
    LogConfig,
    ServerConfig,
    StateConfig,
    UpstreamConfig,
    WebhookConfig,
)
from .logging import setup_logging
from .server import new_event_loop
from .sim import SessionFolder, SimInstance, SimLaravel

DEMO_KEY = "demo-key"
DEMO_SECRET = "demo-secret"
DEMO_SESSIONS = ("demo-1", "demo-2", "demo-3", "demo-4")
SETTLE_TIMEOUT_S = 30.0  # the restore race takes ~5 s (1 s connect, 2.5 s ready, 1 s conflict)


def demo_config(
    port: int = 8080,
    instance_port: int = 3001,
    *,
    webhooks: bool = True,
    laravel_url: str | None = None,
    state_dir: str | None = None,
    admin_token: str | None = None,
) -> Config:
    """conf/router.yaml, plus webhook intake, relayed to `laravel_url` when given (the
    webhook backlog then lives in `state_dir`), the instances' api key (sync lists them
    with it) and, with `admin_token`, the admin API and the status page."""
    wh = WebhookConfig(secrets=(DEMO_SECRET,), laravel_url=laravel_url)
    return Config(
        webhooks=wh if webhooks else WebhookConfig(),
        upstream=UpstreamConfig(api_key=DEMO_KEY),
        admin=AdminConfig(token=admin_token),
        server=ServerConfig(host="127.0.0.1", port=port),
        instances=tuple(
            InstanceConfig(f"node-{instance_port + i}", f"http://127.0.0.1:{instance_port + i}")
            for i in range(4)
        ),
        state=StateConfig(dir=state_dir) if state_dir else StateConfig(),
    )


def instructions(port: int, instance_port: int, laravel_url: str, admin_token: str) -> str:
    base = f"http://127.0.0.1:{port}"
    j = "-H 'Content-Type: application/json'"
    return f"""
wa-router demo: router on {base}, simulated instances on ports {instance_port}-{instance_port + 3}
simulated Laravel on {laravel_url} (webhooks reach it through the router)
api key of the simulated instances: {DEMO_KEY}; connected sessions: {", ".join(DEMO_SESSIONS)}

  status page:  {base}/admin/   (admin token: {admin_token})
  admin status: curl -s -H 'Authorization: Bearer {admin_token}' {base}/admin/status
                or: wa-router status --url {base} --token {admin_token}
  metrics:      curl -s {base}/metrics

  # the pool's health, and every session on every instance
  curl -s {base}/health
  curl -s '{base}/api/sessions?api_key={DEMO_KEY}'

  # send a message: the router finds the instance that holds demo-3
  curl -s -X POST {base}/api/messages/send {j} \\
    -d '{{"session_id":"demo-3","workspace_id":1,"recipient_phone":"628123456789",'\
'"message":"hi","type":"text","api_key":"{DEMO_KEY}"}}'

  # create a session (placed on the least-loaded instance), then watch it connect
  curl -s -X POST {base}/api/sessions {j} \\
    -d '{{"session_id":"my-session","workspace_id":1,"api_key":"{DEMO_KEY}"}}'
  curl -s '{base}/api/sessions/my-session/status?api_key={DEMO_KEY}'

  # errors are JSON with a reason
  curl -s '{base}/api/sessions/nowhere/status?api_key={DEMO_KEY}'
  curl -s '{base}/api/sessions/..%2Fetc/status?api_key={DEMO_KEY}'

Ctrl-C stops everything.
"""


async def _run(port: int, instance_port: int) -> None:
    # The webhook backlog needs a state directory; a demo leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="wa-router-demo-") as state_dir:
        async with SimLaravel(secret=DEMO_SECRET) as laravel:
            await _run_with(port, instance_port, laravel, state_dir)


async def _run_with(port: int, instance_port: int, laravel: SimLaravel, state_dir: str) -> None:
    # A new admin token each run: the demo listens on loopback only, but says so anyway.
    token = secrets.token_urlsafe(18)
    cfg = demo_config(
        port, instance_port, laravel_url=laravel.url, state_dir=state_dir, admin_token=token
    )
    folder = SessionFolder()
    for n, session in enumerate(DEMO_SESSIONS):
        laravel.add_account(session, phone_number=f"62812000{n:04d}")
        folder.save_login(session)
    sims = [
        SimInstance(
            name=i.name,
            port=instance_port + n,
            api_key=DEMO_KEY,
            connect_delay_s=1.0,
            ready_delay_s=2.5,
            laravel_url=f"http://127.0.0.1:{port}",  # Node's LARAVEL_URL: the router
            webhook_secret=DEMO_SECRET,
            folder=folder,
        )
        for n, i in enumerate(cfg.instances)
    ]
    runner = RouterRunner(build_app(cfg), access_log=None, shutdown_timeout=1.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # The instances first, so that the router's first health checks find them up. Their
        # first accounts/active (through the router) may come too early: Node retries it
        # after 1 s, and so do they.
        for sim in sims:
            await sim.start()
        await runner.setup()
        await web.TCPSite(runner, cfg.server.host, port).start()
        print(
            f"wa-router demo: the instances are restoring {len(DEMO_SESSIONS)} sessions...",
            flush=True,
        )
        settling = asyncio.ensure_future(settled(sims, DEMO_SESSIONS))
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait(
            {settling, stopping}, timeout=SETTLE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        settling.cancel()
        if stopping not in done:
            if settling not in done:
                print("wa-router demo: the restore has not settled yet; going on", flush=True)
            print(instructions(port, instance_port, laravel.url, token), flush=True)
            await stopping
    finally:
        await runner.cleanup()
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.stop()


async def settled(sims: list[SimInstance], sessions: tuple[str, ...]) -> None:
    """Until every instance has restored and each session has one connected copy, the
    others dropped (nothing qr_scanning/authenticated, so no takeover is still to come)."""

    def done() -> bool:
        if not all(sim.restore_done.is_set() for sim in sims):
            return False
        for session in sessions:
            statuses = [s.sessions[session].status for s in sims if session in s.sessions]
            if statuses.count("connected") != 1:
                return False
            if any(status not in ("connected", "disconnected") for status in statuses):
                return False
        return True

    while True:  # polled: the state is spread over four instances and their timers
        if done():
            return
        await asyncio.sleep(0.05)


def run_demo(*, port: int = 8080, instance_port: int = 3001) -> int:
    setup_logging(LogConfig(level="info", format="console"))
    loop = new_event_loop()
    try:
        loop.run_until_complete(_run(port, instance_port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"wa-router demo: a port is in use ({exc.strerror}): choose others with "
                f"--port (router, now {port}) and --instance-port (first instance, now "
                f"{instance_port})",
                file=sys.stderr,
            )
            return 2
        print(f"wa-router demo: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0
