"""`/health*` of Blazz's whatsapp-service: no auth, JSON, 500/503 when `sim.unhealthy`.

Routers poll `/health` every few seconds; its `sessions` counts and `memory` figures are
what a least-loaded placement reads, so they follow the instance's sessions.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .models import CONNECTED, now_iso

if TYPE_CHECKING:
    from .instance import SimInstance

MB = 1024 * 1024


def add_health_routes(router: web.UrlDispatcher, sim: SimInstance) -> None:
    api = HealthApi(sim)
    router.add_get("/health", api.health)
    router.add_get("/health/ready", api.health_ready)
    router.add_get("/health/live", api.health_live)
    router.add_get("/health/detailed", api.health_detailed)
    router.add_get("/health/metrics", api.health_metrics)


class HealthApi:
    def __init__(self, sim: SimInstance) -> None:
        self.sim = sim

    def _health_body(self) -> dict[str, Any]:
        sessions = list(self.sim.sessions.values())
        connected = sum(1 for s in sessions if s.status == CONNECTED)
        return {
            "status": "unhealthy" if self.sim.unhealthy else "healthy",
            "uptime": round(time.monotonic() - self.sim.started_monotonic, 3),
            "sessions": {
                "total": len(sessions),
                "connected": connected,
                "disconnected": len(sessions) - connected,
            },
            # process.memoryUsage() shape; ~150 MB per session like the real Chromiums.
            "memory": {
                "rss": (60 + 150 * len(sessions)) * MB,
                "heapTotal": 40 * MB,
                "heapUsed": 30 * MB,
                "external": 2 * MB,
            },
            "timestamp": now_iso(),
        }

    async def health(self, request: web.Request) -> web.Response:
        body = self._health_body()
        if self.sim.unhealthy:
            body["error"] = "Simulated failure"
        return web.json_response(body, status=500 if self.sim.unhealthy else 200)

    async def health_ready(self, request: web.Request) -> web.Response:
        if self.sim.unhealthy:
            return web.json_response({"status": "not_ready", "timestamp": now_iso()}, status=503)
        return web.json_response({"status": "ready", "timestamp": now_iso()})

    async def health_live(self, request: web.Request) -> web.Response:
        # Liveness is "the process answers": true even when unhealthy.
        return web.json_response({"status": "alive", "timestamp": now_iso()})

    async def health_detailed(self, request: web.Request) -> web.Response:
        body = self._health_body()
        body["instance"] = {"name": self.sim.name, "port": self.sim.port}
        body["session_list"] = [s.summary() for s in self.sim.sessions.values()]
        return web.json_response(body, status=500 if self.sim.unhealthy else 200)

    async def health_metrics(self, request: web.Request) -> web.Response:
        body = self._health_body()
        return web.json_response(
            {
                "sessions": body["sessions"],
                "memory": body["memory"],
                "uptime": body["uptime"],
                "requests_total": len(self.sim.received),
                "timestamp": body["timestamp"],
            }
        )
