"""A real redis-server for tests, on a free loopback port (never the machine's own 6379).

Synchronous on purpose: the event loop is per test function, the process can outlive it.

    redis_server = redis_server_fixture()          # in a test module: one per module

    async def test_x(redis_server: RedisServer) -> None:
        store = RedisStore(redis_server.url, key_prefix=unique_prefix())
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = "redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout_s: float = 0.2) -> bool:
    """Whether a Redis answers PING on loopback `port` (a raw RESP exchange: no client)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a deadline: never leave a server behind."""
    proc.terminate()
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unique_prefix() -> str:
    """A key prefix of its own for each test, so tests never see each other's keys."""
    return f"t-{uuid.uuid4().hex[:12]}:"


class RedisServer:
    """One redis-server process: no persistence, loopback only, restartable on its port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="wa-router-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> str:
        path = Path(self._dir.name, "redis.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout_s: float = 10.0) -> None:
        assert self._proc is None, "already running"
        self._proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
                "--logfile", "redis.log",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not ping(self.port):
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.01)

    def pause(self) -> None:
        """SIGSTOP: the port stays open, nothing is answered (a hung Redis)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.send_signal(signal.SIGCONT)  # a paused one could not act on SIGTERM
            terminate(proc)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


def started_redis_server(attempts: int = 3) -> RedisServer:
    """A running server; skips the test when redis-server is not installed. Another
    process may take the free port before redis binds it: then try another port."""
    if shutil.which(REDIS_SERVER) is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    for attempt in range(attempts):
        server = RedisServer()
        try:
            server.start()
            return server
        except RuntimeError:
            server.close()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def redis_server_fixture(scope: Any = "module") -> Callable[..., Any]:
    """A pytest fixture (assign it to a name in a test module) yielding a RedisServer."""

    def fixture() -> Iterator[RedisServer]:
        server = started_redis_server()
        try:
            yield server
        finally:
            server.close()

    return pytest.fixture(scope=scope)(fixture)


class SentinelServer:
    """One redis-sentinel process watching `master` (a RedisServer) under the name
    `name`: the sentinel binary when installed, else redis-server in sentinel mode."""

    def __init__(self, master: RedisServer, name: str = "mymaster") -> None:
        self.port = free_port()
        self.name = name
        self._master = master
        self._dir = tempfile.TemporaryDirectory(prefix="wa-router-sentinel-")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        conf = Path(self._dir.name, "sentinel.conf")
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self._dir.name}\n"
            f"logfile sentinel.log\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self._master.port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 5000\n"
        )
        binary = shutil.which("redis-sentinel")
        argv = [binary, str(conf)] if binary else [REDIS_SERVER, str(conf), "--sentinel"]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while not self.knows_master():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-sentinel on {self.port} did not come up")
            time.sleep(0.02)

    def knows_master(self) -> bool:
        """Whether it answers where `name`'s master is (a raw RESP exchange)."""
        cmd = f"SENTINEL get-master-addr-by-name {self.name}\r\n".encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(cmd)
                return str(self._master.port).encode() in s.recv(256)
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc)
        self._dir.cleanup()
