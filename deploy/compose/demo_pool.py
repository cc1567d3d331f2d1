"""The compose `demo` profile's pool: four simulated Blazz instances and a simulated
Laravel, reachable from the other containers (`wa-router demo` puts everything, the router
included, on 127.0.0.1 of one process; here the two compose routers on Redis front it).

    service demo-pool:  instances on :3001-:3004, Laravel on :8000
    Node's LARAVEL_URL: the routers (alias wa-router), which relay to Laravel here

As in Blazz's PM2 pool, the demo sessions exist as Laravel accounts with a saved login in
the shared session folder: every instance restores all of them on start, through the
router (`accounts/active`), and the last `session_ready` wins. Node gives that up after
3 s without an answer, so the instances start once a router answers.

Environment (all optional): DEMO_ROUTER_URL (http://wa-router:8080), DEMO_HOST (0.0.0.0),
DEMO_INSTANCE_PORTS (3001,3002,3003,3004), DEMO_LARAVEL_PORT (8000).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import aiohttp

from wa_router.config import LogConfig
from wa_router.demo import DEMO_KEY, DEMO_SECRET, DEMO_SESSIONS
from wa_router.logging import setup_logging
from wa_router.sim import SessionFolder, SimInstance, SimLaravel


async def wait_for_router(url: str, stop: asyncio.Event) -> bool:
    """Until the router answers /healthz (True), or a stop signal comes (False)."""
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    return False


async def main() -> int:
    router = os.environ.get("DEMO_ROUTER_URL", "http://wa-router:8080").rstrip("/")
    host = os.environ.get("DEMO_HOST", "0.0.0.0")
    ports = [
        int(p) for p in os.environ.get("DEMO_INSTANCE_PORTS", "3001,3002,3003,3004").split(",")
    ]
    laravel_port = int(os.environ.get("DEMO_LARAVEL_PORT", "8000"))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    laravel = SimLaravel(host=host, port=laravel_port, secret=DEMO_SECRET)
    folder = SessionFolder()
    for n, session in enumerate(DEMO_SESSIONS):
        laravel.add_account(session, phone_number=f"62812000{n:04d}")
        folder.save_login(session)
    sims = [
        SimInstance(
            name=f"node-{port}",
            host=host,
            port=port,
            api_key=DEMO_KEY,
            connect_delay_s=1.0,
            ready_delay_s=2.5,
            laravel_url=router,  # Node's LARAVEL_URL: the router
            webhook_secret=DEMO_SECRET,
            folder=folder,
        )
        for port in ports
    ]
    await laravel.start()
    try:
        print(f"demo-pool: Laravel on :{laravel_port}; waiting for {router}", flush=True)
        if await wait_for_router(router, stop):
            for sim in sims:
                await sim.start()
            print(
                f"demo-pool: instances on :{','.join(map(str, ports))} restoring "
                f"{', '.join(DEMO_SESSIONS)}; api key {DEMO_KEY}",
                flush=True,
            )
            await stop.wait()
    finally:
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.stop()
        await laravel.stop()
    return 0


if __name__ == "__main__":
    setup_logging(LogConfig(level="info", format="json"))
    sys.exit(asyncio.run(main()))
