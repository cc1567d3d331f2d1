"""Python work per request: the router's own CPU with no sockets and no kernel in the way.

The throughput part measures a whole proxy on a shared, noisy machine; this one measures
only what the router's Python does for one request, so two versions of the request path can
be told apart by a few percent. The router runs in this process as `wa-router serve` builds
it (lean front, uvloop, memory store, 4 instances); its sockets are replaced by in-memory
transports: callers that send the next request as soon as an answer is written (32 at
once), and instances whose pooled connections answer each request at once with nginx's
75-byte `connected` answer (the upstream of the throughput part). The figure is process
CPU time per request (time.process_time), with the cycle collector's runs counted too.

Compared in one interleaved run: GET (session in the path) and POST (session in the JSON
body), each with the express lane (`server.express_lane: true`, the default) and without
(every request by the full path in the connection's worker task).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from . import common as c

CALLERS = 32
DOC_PARAS = (__doc__ or "").split("\n\n")[1:]  # the method, for the report
HEAD = ["request", "express lane", "CPU us/req median (min-max)",
        "cycle collections per 1k requests", "non-200"]  # fmt: skip
SESSIONS = 100
API_KEY = "k"
BODY = b'{"session_id":"bench","status":"connected","success":true,"message_id":"x"}'
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
    % len(BODY)
) + BODY
MESSAGE = "Halo Budi! Pesanan #48213 sudah kami terima dan sedang diproses, estimasi kirim besok."


def get_request(n: int) -> bytes:
    target = f"/api/sessions/s{n}/status?api_key={API_KEY}"
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n".encode()


def post_request(n: int) -> bytes:
    body = json.dumps(
        {"session_id": f"s{n}", "workspace_id": 1, "recipient_phone": "628123456789",
         "message": MESSAGE, "type": "text", "api_key": API_KEY}, separators=(",", ":"),
    ).encode()  # fmt: skip
    head = "POST /api/messages/send HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


KINDS: dict[str, Callable[[int], bytes]] = {"GET": get_request, "POST": post_request}


class _Transport:
    """What the protocols write to and ask of their transport, in memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Any) -> None:
        self.loop, self.protocol, self.closing = loop, protocol, False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class _Upstream(_Transport):
    """A pooled connection to an instance: every request answered at once."""

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.protocol.data_received, ANSWER)


class _Caller(_Transport):
    """A caller in a closed loop: the next request as soon as an answer is written."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Any, run: _Run) -> None:
        super().__init__(loop, protocol)
        self.run = run

    def write(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 100"):
            self.run.answered(self, data)

    def writelines(self, lines: list[bytes]) -> None:
        self.write(b"".join(lines))


class _Run:
    """Exactly `count` requests, each caller sending its next as its answer is written."""

    def __init__(self, loop: asyncio.AbstractEventLoop, make: Callable[[int], bytes]) -> None:
        # Made before the clock starts: the callers' own work is not the router's.
        self.loop, self.wire = loop, [make(n) for n in range(SESSIONS)]
        self.to_send = self.outstanding = self.sent = self.bad = 0
        self.done: asyncio.Future[None] | None = None

    def answered(self, caller: _Caller, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200"):
            self.bad += 1
        self.outstanding -= 1
        if self.to_send > 0:
            self.send(caller)
        elif self.outstanding == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def send(self, caller: _Caller) -> None:
        self.to_send -= 1
        self.outstanding += 1
        self.sent += 1
        self.loop.call_soon(caller.protocol.data_received, self.wire[self.sent % SESSIONS])

    async def requests(self, callers: list[_Caller], count: int) -> None:
        self.to_send, self.done = count, self.loop.create_future()
        for caller in callers[:count]:
            self.send(caller)
        await self.done


@dataclass(frozen=True, slots=True)
class Result:
    us_per_request: float
    collections_per_1k: float  # the cycle collector's runs (all generations)
    bad: int  # answers that were not 200


async def _measure(kind: str, lane: bool, count: int, tmp: Path) -> Result:
    from wa_router import h1
    from wa_router.app import RouterRunner, build_app
    from wa_router.config import load_config
    from wa_router.h1response import Conn
    from wa_router.logging import setup_logging

    async def connect(host: h1._Host) -> Conn:
        conn = Conn(host)
        conn.connection_made(_Upstream(host.loop, conn))  # type: ignore[arg-type]
        return conn

    h1._Host._connect = connect  # type: ignore[method-assign]  # no sockets: see the docstring
    doc = {
        "server": {"host": "127.0.0.1", "port": 1, "express_lane": lane},
        "instances": [{"name": f"node-{p}", "url": f"http://127.0.0.1:{p}"} for p in range(4)],
        "upstream": {"api_key": API_KEY},
        "health": {"interval_s": 3600},
        "sync": {"interval_s": 3600},
        "log": {"level": "warning"},
        "state": {"dir": str(tmp / "state")},
    }
    (path := tmp / "router.yaml").write_text(json.dumps(doc))
    cfg = load_config(path, env={})
    setup_logging(cfg.log)
    runner = RouterRunner(build_app(cfg), access_log=None)
    await runner.setup()
    try:
        loop = asyncio.get_running_loop()
        run = _Run(loop, KINDS[kind])
        factory = runner.server
        assert factory is not None
        callers = []
        for _ in range(CALLERS):
            protocol = factory()
            caller = _Caller(loop, protocol, run)
            protocol.connection_made(caller)  # type: ignore[arg-type]
            callers.append(caller)
        await run.requests(callers, SESSIONS * 20)  # every session found, connections open
        gc.collect()
        gc.freeze()  # as `wa-router serve` does after its start
        before = sum(s["collections"] for s in gc.get_stats())
        started = time.process_time()
        await run.requests(callers, count)
        used = time.process_time() - started
        collected = sum(s["collections"] for s in gc.get_stats()) - before
        return Result(1e6 * used / count, 1000 * collected / count, run.bad)
    finally:
        await runner.cleanup()
        gc.unfreeze()


def measure(kind: str, lane: bool, count: int) -> Result:
    import uvloop

    with TemporaryDirectory(prefix="wa-pywork-") as tmp:
        return uvloop.run(_measure(kind, lane, count, Path(tmp)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--requests", type=int, default=40_000, help="per measurement")
    parser.add_argument("--smoke", action="store_true", help="CI: 1 round of 2,000 requests")
    parser.add_argument("--out", type=Path, help="default: bench/results/pywork.md")


def run(args: argparse.Namespace) -> int:
    rounds, count = (1, 2000) if args.smoke else (args.rounds, args.requests)
    out = args.out or (c.SCRATCH / "pywork-smoke.md" if args.smoke else c.RESULTS / "pywork.md")
    configs = [(kind, lane) for kind in KINDS for lane in (True, False)]
    got: dict[tuple[str, bool], list[Result]] = {}
    started = time.monotonic()
    for rnd in range(rounds):
        order = configs[rnd % len(configs) :] + configs[: rnd % len(configs)]
        for kind, lane in order:
            r = measure(kind, lane, count)
            got.setdefault((kind, lane), []).append(r)
            print(f"round {rnd + 1}/{rounds} {kind:<4} lane={'on' if lane else 'off':<3} "
                  f"{r.us_per_request:6.2f} us/req  gc {r.collections_per_1k:.2f}/1k  "
                  f"bad {r.bad}", flush=True)  # fmt: skip
    rows, med = [], {}
    for kind, lane in configs:
        rs = got[(kind, lane)]
        us = [r.us_per_request for r in rs]
        med[(kind, lane)] = statistics.median(us)
        rows.append([kind, "on" if lane else "off (full path)",
                     f"{statistics.median(us):.1f} ({min(us):.1f}-{max(us):.1f})",
                     f"{statistics.median(r.collections_per_1k for r in rs):.2f}",
                     str(sum(r.bad for r in rs))])  # fmt: skip
    lines = [
        "## Python work per request (no sockets)",
        "",
        f"`python -m bench pywork{' --smoke' if args.smoke else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {(time.monotonic() - started) / 60:.1f} min: "
        f"{rounds} interleaved round(s) of {count:,} requests per configuration, "
        f"{CALLERS} callers, {SESSIONS} sessions.",
        "",
        *(line for para in DOC_PARAS for line in (" ".join(para.split()), "")),
        c.md_table(HEAD, rows),
        "",
    ]
    for kind in KINDS:
        on, off = med[(kind, True)], med[(kind, False)]
        lines.append(f"- {kind}: the lane takes {on / off:.2f}x the full path's CPU "
                     f"({on:.1f} vs {off:.1f} us).")  # fmt: skip
    lines.append("- What the kernel adds on real sockets (the reads, writes and epoll of a "
                 "request) is in the throughput part's user/system split.")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    bad = sum(r.bad for rs in got.values() for r in rs)
    return 1 if bad else 0
