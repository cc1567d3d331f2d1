"""What failover, herd and directory share: session ids, core pinning, simulated instances
with arrival times, the router as a pinned subprocess, the event loop, percentiles.

The parts run the simulated instances (and their load generator) in the bench's own event
loop, pinned to one core, and the router in a subprocess pinned to the other core, so the
router's latency is not the load generator's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from wa_router.sim import Received, SimInstance

from . import common as c

API_KEY = "test-key"
WEBHOOK_SECRET = "test-secret"
ADMIN_TOKEN = "bench-admin-token-0123456789"
WEBHOOK_PATH = "/api/whatsapp/webhooks/webjs"
NEGATIVE = 'wa_router_rediscoveries_total{outcome="negative_cache"}'

T = TypeVar("T")


# -- session ids -----------------------------------------------------------------------------


def session_ids(count: int, seed: int = 1) -> list[str]:
    """Ids as Blazz makes them: `webjs_<workspace>_<ms timestamp>_<6 random chars>`."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    base_ms = 1_718_000_000_000
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        sid = (f"webjs_{rng.randint(1, 5000)}_{base_ms + rng.randint(0, 10**10)}_"
               f"{''.join(rng.choices(alphabet, k=6))}")  # fmt: skip
        if sid not in seen:
            seen.add(sid)
            out.append(sid)
    return out


# -- cores -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cores:
    """The bench's own core (load generator, simulated instances) and the router's."""

    bench: int | None
    router: int | None
    taskset: str | None

    @classmethod
    def split(cls) -> Cores:
        cpus = sorted(os.sched_getaffinity(0))
        taskset = c.find_tool("taskset")
        if len(cpus) < 2 or taskset is None:
            return cls(None, None, None)
        return cls(cpus[0], cpus[1], taskset)

    def router_prefix(self) -> list[str]:
        return c.pinned(None if self.router is None else str(self.router), self.taskset)

    def describe(self, other: str = "the router subprocess") -> str:
        if self.bench is None:
            return "not pinned (fewer than 2 usable cores or no taskset)"
        return (f"the bench process (load generator and simulated instances, one event loop) on "
                f"core {self.bench}; {other} on core {self.router} (`taskset -c`)")  # fmt: skip


@contextlib.contextmanager
def affinity(cpu: int | None) -> Iterator[None]:
    """Run this process on `cpu` for the duration (children inherit it); None: unchanged."""
    before = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_loop(main: Awaitable[T]) -> T:
    """Run `main` on uvloop when installed (the load generator needs the headroom)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)  # type: ignore[arg-type]


# -- simulated instances with arrival times --------------------------------------------------


class TimedLog(list[Received]):
    """A sim's `received` list that also keeps each arrival's `time.perf_counter()`."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Received) -> None:
        self.times.append(time.perf_counter())
        super().append(item)

    def clear(self) -> None:
        self.times.clear()
        super().clear()

    def timed(self) -> Iterator[tuple[float, Received]]:
        return zip(self.times, self, strict=True)


def timed(sim: SimInstance) -> TimedLog:
    log = sim.received if isinstance(sim.received, TimedLog) else TimedLog()
    sim.received = log
    return log


NODE_BACKLOG = 511  # Node's default for server.listen(); aiohttp's TCPSite uses 128


def set_backlog(sim: SimInstance, backlog: int) -> bool:
    """Re-listen a running sim's socket with another accept backlog (Linux applies a second
    listen() to the live socket). The sim listens with aiohttp's 128, where a burst of 256
    connects from the router overflows and SYNs are dropped; Node listens with 511."""
    site = next(iter(getattr(getattr(sim, "_runner", None), "sites", ())), None)
    server = getattr(site, "_server", None)
    if server is None or not server.sockets:
        return False
    for sock in server.sockets:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            dup.listen(backlog)
        finally:
            dup.close()
    return True


def listen_ports(count: int) -> list[int]:
    """Free loopback ports below the kernel's ephemeral range, so a stopped sim can start
    again on its port (an ephemeral port may be taken by any outgoing connection meanwhile)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20000, max(20001, low))
        if port in c.RESERVED_PORTS or port in ports:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


async def start_sims(
    count: int, webhook_url: str | None = None, backlog: int | None = NODE_BACKLOG
) -> list[SimInstance]:
    ports = listen_ports(count)
    sims = [
        SimInstance(name=f"node-{i + 1}", port=ports[i], api_key=API_KEY,
                    webhook_url=webhook_url, webhook_secret=WEBHOOK_SECRET, ready_delay_s=0.0)
        for i in range(count)
    ]  # fmt: skip
    for sim in sims:
        timed(sim)
        await start_sim(sim, backlog)
    return sims


async def start_sim(sim: SimInstance, backlog: int | None = NODE_BACKLOG) -> None:
    await sim.start()
    if backlog is not None and not set_backlog(sim, backlog):
        print(f"bench: could not set the listen backlog of {sim.name}", file=sys.stderr)


async def stop_sims(sims: Iterable[SimInstance]) -> None:
    for sim in sims:
        with contextlib.suppress(Exception):
            await sim.stop()


# -- the router subprocess -------------------------------------------------------------------


def router_config(
    port: int, sims: Sequence[SimInstance], state_dir: Path, **sections: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 1},
        "instances": [{"name": s.name, "url": s.url} for s in sims],
        "upstream": {"api_key": API_KEY},
        "sync": {"interval_s": 3600},
        "admin": {"token": ADMIN_TOKEN},
        "log": {"level": "warning", "format": "json"},
        "state": {"dir": str(state_dir)},
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    return doc


class RouterProc:
    """`python -m wa_router.cli serve` (uvloop) pinned to the router core, in a temp dir."""

    def __init__(self, tmp: Path, cores: Cores, name: str = "router") -> None:
        self.tmp, self.cores, self.name = tmp, cores, name
        self.port = listen_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: c.Proc | None = None

    async def start(self, doc: dict[str, Any], http: aiohttp.ClientSession) -> None:
        self.spawn(doc)
        await self.wait_ready(http)

    def spawn(self, doc: dict[str, Any]) -> None:
        """Start the process without waiting for it (`wait_alive`, `wait_ready`)."""
        path = self.tmp / f"{self.name}.yaml"
        path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if not k.startswith("WA_ROUTER_")}
        env["PYTHONPATH"] = str(c.REPO)
        argv = [sys.executable, "-m", "wa_router.cli", "serve", "-c", str(path), "--loop", "uvloop"]
        self.proc = c.Proc(self.name, [*self.cores.router_prefix(), *argv], self.tmp, env)

    @property
    def log_path(self) -> Path | None:
        return None if self.proc is None else self.proc.log_path

    async def wait_alive(self, http: aiohttp.ClientSession, timeout_s: float = 30.0) -> None:
        """Until /healthz answers: listening (its instances may all be down still)."""
        await self._wait_for("/healthz", "alive", http, timeout_s)

    async def wait_ready(self, http: aiohttp.ClientSession, timeout_s: float = 30.0) -> None:
        """Until /readyz says ready: listening, warm sync done, an instance healthy."""
        await self._wait_for("/readyz", "ready", http, timeout_s)

    async def _wait_for(
        self, path: str, what: str, http: aiohttp.ClientSession, timeout_s: float
    ) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                code = self.proc.popen.returncode
                raise RuntimeError(f"router exited {code}: {self.proc.tail()}")
            try:
                async with http.get(f"{self.url}{path}") as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}: {await resp.text()}"
            except aiohttp.ClientError as exc:
                last = repr(exc)
            await asyncio.sleep(0.05)
        raise TimeoutError(f"router not {what}: {last}")

    async def metrics(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """`/metrics` as {`name{labels}`: value}. (Not /admin/status: it answers 500 once a
        webhook was received; see the failover notes.)"""
        async with http.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def discovery(self, http: aiohttp.ClientSession) -> dict[str, int]:
        """The router's discovery stats and directory size, from its metrics."""
        m = await self.metrics(http)
        found = int(m.get('wa_router_rediscoveries_total{outcome="found"}', 0))
        not_found = int(m.get('wa_router_rediscoveries_total{outcome="not_found"}', 0))
        return {
            "scans": found + not_found,
            "probes": int(m.get("wa_router_discovery_probes_total", 0)),
            "found": found,
            "not_found": not_found,
            "negative_hits": int(m.get(NEGATIVE, 0)),
            "directory": int(sum(v for k, v in m.items()
                                 if k.startswith("wa_router_instance_sessions{"))),
            "retries_answered": int(m.get('wa_router_retries_total{outcome="answered"}', 0)),
            "retries_failed": int(m.get('wa_router_retries_total{outcome="failed"}', 0)),
        }  # fmt: skip

    async def states(self, http: aiohttp.ClientSession) -> dict[str, str]:
        m = await self.metrics(http)
        out: dict[str, str] = {}
        for key, value in m.items():
            if key.startswith("wa_router_instance_state{") and value == 1.0:
                pairs = key[key.index("{") + 1 : -1].split(",")
                labels = dict(part.split("=", 1) for part in pairs)
                out[labels["upstream"].strip('"')] = labels["state"].strip('"')
        return out

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            await asyncio.to_thread(proc.stop)


@contextlib.asynccontextmanager
async def client(limit: int = 0, keepalive_s: float = 60.0) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=keepalive_s)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as http:
        yield http


def error_cause(status: int, data: bytes) -> tuple[str, bool, str]:
    """(cause, sent, instance) of a non-200 answer: the router's `error` code with whether
    the request left for `instance` and was retried, or the instance's own error."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or "error" not in doc:
        return f"HTTP {status} (not JSON)", False, ""
    if "message" not in doc:  # the instance's own error, passed through
        return f"instance: HTTP {status} {doc['error']}", False, ""
    code, sent = str(doc["error"]), False
    instance = str(doc.get("instance") or "")
    if code in ("upstream_unreachable", "upstream_timeout"):
        sent = "nothing was sent" not in str(doc.get("message", ""))
        flags = ["sent" if sent else "not sent"]
        if "retried" in doc:
            flags.append("retried" if doc["retried"] else "not retried")
        code += f" ({', '.join(flags)})"
    elif doc.get("unreachable"):
        code += f" (unreachable: {', '.join(map(str, doc['unreachable']))})"
    return code, sent, instance


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    if ordered[hi] == ordered[lo] or math.isinf(ordered[hi]):
        return ordered[hi] if pos > lo else ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ms(values: Sequence[float]) -> list[float]:
    return [v * 1000 for v in values]


def spread(values: Sequence[float | None], digits: int = 1) -> str:
    """`median (min-max)` of the values that exist; infinity (never, within the run) as
    `never`."""
    text = c.fmt_spread([v for v in values if v is not None], digits)
    return text.replace("inf", "never")


def write_results(text: str, out: Path) -> None:
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", flush=True)


def header(
    title: str, command: str, elapsed_s: float, smoke: bool, load_at_start: str
) -> list[str]:
    out = [f"## {title}", ""]
    if smoke:
        out += ["> **Smoke run** (tiny sizes): it checks that the bench works; its numbers "
                "mean nothing.", ""]  # fmt: skip
    v = c.versions()
    out += [f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, {elapsed_s:.0f} s; "
            f"wa-router {v['wa-router']}, Python {sys.version.split()[0]}, aiohttp / multidict "
            f"/ yarl {v['aiohttp / multidict / yarl']}, uvloop {v['uvloop']}; "
            f"load average at start {load_at_start}.", ""]  # fmt: skip
    return out


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
