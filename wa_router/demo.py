"""`wa-router demo`: four simulated Blazz instances and the router, in one process.

The embedded default: memory store, the Blazz profile, instances on 127.0.0.1:3001-3004
(the ports of `conf/router.yaml`), and a few connected sessions to try requests on.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from aiohttp import web

from .app import build_app
from .config import Config, InstanceConfig, LogConfig, ServerConfig, WebhookConfig
from .logging import setup_logging
from .server import new_event_loop
from .sim import SimInstance

DEMO_KEY = "demo-key"
DEMO_SECRET = "demo-secret"
DEMO_SESSIONS = ("demo-1", "demo-2", "demo-3", "demo-4")


def demo_config(port: int = 8080, instance_port: int = 3001, *, webhooks: bool = True) -> Config:
    """conf/router.yaml, plus webhook intake (no Laravel: the router learns from them)."""
    return Config(
        webhooks=WebhookConfig(secrets=(DEMO_SECRET,)) if webhooks else WebhookConfig(),
        server=ServerConfig(host="127.0.0.1", port=port),
        instances=tuple(
            InstanceConfig(f"node-{instance_port + i}", f"http://127.0.0.1:{instance_port + i}")
            for i in range(4)
        ),
    )


def instructions(port: int, instance_port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    j = "-H 'Content-Type: application/json'"
    return f"""
wa-router demo: router on {base}, simulated instances on ports {instance_port}-{instance_port + 3}
api key of the simulated instances: {DEMO_KEY}; connected sessions: {", ".join(DEMO_SESSIONS)}

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
    cfg = demo_config(port, instance_port)
    hook = f"http://127.0.0.1:{port}{cfg.webhooks.path}"
    sims = [
        SimInstance(
            name=i.name,
            port=instance_port + n,
            api_key=DEMO_KEY,
            connect_delay_s=1.0,
            webhook_url=hook,
            webhook_secret=DEMO_SECRET,
        )
        for n, i in enumerate(cfg.instances)
    ]
    runner = web.AppRunner(build_app(cfg), access_log=None, shutdown_timeout=1.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for sim in sims:
            await sim.start()
        for n, session in enumerate(DEMO_SESSIONS):
            sims[(n * 2) % len(sims)].add_session(session, phone_number=f"62812000{n:04d}")
        await runner.setup()
        await web.TCPSite(runner, cfg.server.host, port).start()
        print(instructions(port, instance_port), flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.stop()


def run_demo(*, port: int = 8080, instance_port: int = 3001) -> int:
    setup_logging(LogConfig(level="info", format="console"))
    loop = new_event_loop()
    try:
        loop.run_until_complete(_run(port, instance_port))
    except OSError as exc:
        print(f"wa-router demo: {exc}")
        return 1
    finally:
        loop.close()
    return 0
