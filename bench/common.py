"""Helpers shared by the bench parts: tools, ports, processes, CPU accounting, wrk, the
machine and versions, statistics and Markdown tables, py-spy profiles.

Every process a part starts goes through `Proc` (its own process group, stopped with
SIGTERM then SIGKILL), so nothing outlives a run, even one interrupted with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
SCRATCH = BENCH / "out"  # git-ignored: raw data, profiles, smoke reports
WRK_SCRIPTS = BENCH / "wrk"
NGINX_TEMPLATES = BENCH / "nginx"

EXIT_MISSING_TOOL = 2
# Ports a bench must never use, even if the kernel offered them.
RESERVED_PORTS = frozenset({80, 443, 3306, 5432, 6379})
CLK_TCK = os.sysconf("SC_CLK_TCK")

INSTALL_HINTS = {
    "nginx": "apt-get install nginx-light",
    "wrk": "apt-get install wrk",
    "taskset": "apt-get install util-linux",
    "py-spy": f"{sys.executable} -m pip install py-spy",
}
KNOWN_PATHS = {"nginx": ("/usr/sbin/nginx",), "wrk": ("/usr/bin/wrk",)}


# -- tools -----------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    beside_python = Path(sys.executable).with_name(name)
    candidates = [shutil.which(name), str(beside_python), *KNOWN_PATHS.get(name, ())]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def require_tools(names: Iterable[str]) -> dict[str, str]:
    """The path of every tool; when one is missing, say how to install it and exit 2."""
    found = {name: find_tool(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        hints = sorted({INSTALL_HINTS.get(n, f"install {n}") for n in missing})
        head = f"bench: missing {', '.join(missing)}; install with:"
        print(head, *hints, sep="\n  ", file=sys.stderr)
        raise SystemExit(EXIT_MISSING_TOOL)
    return {name: path for name, path in found.items() if path is not None}


# -- ports and processes ---------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together while picked)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
            port = sock.getsockname()[1]
            if port not in RESERVED_PORTS:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def wait_http(url: str, timeout_s: float = 20.0, proc: Proc | None = None) -> None:
    """Until `url` answers 200 (the process under test is up and can route)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url}: {last}")


@dataclass(frozen=True, slots=True)
class Cores:
    """Where processes run (`taskset -c` lists): the load (upstream + load generator) on one
    core, the process under test on another; all None when unpinned (no taskset, 1 core)."""

    load: str | None = None
    proxy: str | None = None
    taskset: str | None = None

    @classmethod
    def pick(cls) -> Cores:
        taskset, cpus = find_tool("taskset"), sorted(os.sched_getaffinity(0))
        return cls(str(cpus[0]), str(cpus[1]), taskset) if taskset and len(cpus) > 1 else cls()

    def of(self, workers: int = 1) -> str | None:
        """The cores of the process under test: both when it runs several workers."""
        return f"{self.load},{self.proxy}" if workers > 1 and self.taskset else self.proxy

    def describe(self, workers: int = 1) -> str:
        shared = " (shared with the load)" if workers > 1 and self.taskset else ""
        return f"{self.of(workers) or 'unpinned'}{shared}"


def pinned(cores: str | None, taskset: str | None) -> list[str]:
    """The command prefix that pins a process (and its children) to `cores`."""
    return [taskset, "-c", cores] if cores and taskset else []


class Proc:
    """A process in its own process group, its output in a log file, stopped by `stop()`."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name, self.log_path = name, log_dir / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                list(argv), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.pid = self.popen.pid

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace_s)
        # Whatever is left of the group (workers of a master that died first, say).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace_s)


# -- CPU accounting --------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _all_stats() -> dict[int, list[str]]:
    pids = (int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit())
    return {pid: fields for pid in pids if (fields := _stat_fields(pid)) is not None}


def process_tree(root: int, stats: dict[int, list[str]] | None = None) -> list[int]:
    """`root` and all its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for pid, fields in (stats or _all_stats()).items():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        tree.append(pid := todo.pop())
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of `root` and its descendants (utime + stime, all threads)."""
    return sum(tree_cpu_split_s(root))


def tree_cpu_split_s(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `root` and its descendants (utime, stime)."""
    stats = _all_stats()
    # utime and stime are stat fields 14 and 15 (11 and 12 after the command name).
    tree = [stats[p] for p in process_tree(root, stats) if p in stats]
    user, system = (sum(int(fields[i]) for fields in tree) / CLK_TCK for i in (11, 12))
    return user, system


def busy_others(window_s: float = 1.0, min_share: float = 0.1) -> str:
    """Processes not ours that used >= `min_share` of a core over `window_s`: the noise."""
    before = _all_stats()
    time.sleep(window_s)
    after, mine = _all_stats(), set(process_tree(os.getpid()))
    busy = []
    for pid, fields in after.items():
        was = before.get(pid, fields)
        share = (sum(map(int, fields[11:13])) - sum(map(int, was[11:13]))) / CLK_TCK / window_s
        if share >= min_share and pid not in mine:
            with contextlib.suppress(OSError, IndexError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                cmd = " ".join([Path(argv[0]).name, *argv[1:]]).strip()[:70]
                busy.append(f"`{cmd}` {share:.0%}")
    return "; ".join(busy) or "none"


# -- wrk -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    socket_errors: int  # connect + read + write + timeouts
    non_2xx: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def run_wrk(
    wrk: str,
    url: str,
    script: Path,
    connections: int,
    duration_s: int,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> WrkResult:
    """One closed-loop wrk run; the script's done() prints the `BENCH_JSON` line."""
    threads = 1 if connections == 1 else 2
    argv = [*prefix, wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s"]
    argv += ["--timeout", "5s", "-s", str(script), url]
    run_env = {**os.environ, **(env or {}), "LUA_PATH": f"{script.parent}/?.lua;;"}
    out = subprocess.run(
        argv, capture_output=True, text=True, env=run_env, timeout=duration_s + 30, check=False
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    doc = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(doc[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    ms = {k: doc[f"{k}_us"] / 1000 for k in ("p50", "p90", "p99")}
    return WrkResult(int(doc["requests"]), doc["duration_us"] / 1e6, ms["p50"], ms["p90"],
                     ms["p99"], int(errors), int(doc["status_errors"]))  # fmt: skip


# -- machine and versions --------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpuinfo: list[str] = []
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name"))
    return {
        "CPU": next(models, "unknown"),
        "cores": f"{os.cpu_count()} online, {len(os.sched_getaffinity(0))} usable by the bench",
        "kernel": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "busy processes at start (not the bench)": busy_others(),
    }


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) clock ticks of every CPU since boot (/proc/stat; (0, 0) unreadable).
    Stolen: while this machine, a VM, was ready to run and its host ran something else."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0, 0
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7] if len(ticks) > 7 else 0


def stolen_share(before: tuple[int, int], after: tuple[int, int]) -> str:
    """The share of the CPU time between two `cpu_ticks` readings that the host took."""
    total, stolen = (b - a for a, b in zip(before, after, strict=True))
    return f"{stolen / total:.1%} of all CPU time" if total > 0 else "unknown"


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def versions() -> dict[str, str]:
    """What every bench report names: the interpreter, the libraries, the tools, the code."""

    def pkg(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    init = (REPO / "wa_router" / "__init__.py").read_text().partition("__version__ = ")[2]
    wa = init.split()[0].strip("\"'") if init else "?"
    git = ["git", "-C", str(REPO)]
    dirty = tool_version([*git, "status", "--porcelain", "--untracked-files=no"])
    changed = " + uncommitted changes" if dirty not in ("", "unknown", "not found") else ""
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "aiohttp / multidict / yarl": " / ".join(pkg(n) for n in ("aiohttp", "multidict", "yarl")),
        "uvloop": pkg("uvloop"),
        "nginx": tool_version([find_tool("nginx") or "nginx", "-v"]),
        "wrk": tool_version([find_tool("wrk") or "wrk", "-v"]).split(" Copyright")[0],
        "wa-router": f"{wa} (git {tool_version([*git, 'rev-parse', '--short', 'HEAD'])}{changed})",
        "py-spy": tool_version([find_tool("py-spy") or "py-spy", "--version"]),
    }


# -- statistics and tables -------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_spread(values: Sequence[float], digits: int = 2) -> str:
    """`median (min-max)`, or the single value, or `-`."""
    if len(values) < 2:
        return fmt(values[0] if values else None, digits)
    return f"{fmt(median(values), digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def verdict(value: float, goal: float, unit: str, *, strict: bool = False, digits: int = 2) -> str:
    """Met, or missed by how much: `value` against an upper bound `goal`."""
    if value < goal or (value == goal and not strict):
        return f"met ({goal - value:.{digits}f} {unit} to spare)"
    return f"**missed** by {value - goal:.{digits}f} {unit} ({value / goal:.2f}x the target)"


def verdict_at_least(value: float, goal: float, unit: str, digits: int = 2) -> str:
    """Met, or missed by how much: `value` against a lower bound `goal`."""
    if value >= goal:
        return f"met ({value - goal:,.{digits}f} {unit} to spare)"
    return f"**missed** by {goal - value:,.{digits}f} {unit} ({value / goal:.2f}x the target)"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


# -- profiles --------------------------------------------------------------------------------


def speedscope_top(path: Path, count: int = 15) -> list[tuple[str, float, float]]:
    """(function (file:hottest line), own %, total %) from a py-spy speedscope file, the
    `count` functions with the most own time (samples where the function is the leaf)."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    where = re.compile(r"^.*/(site-packages|lib/python3\.\d+)/")

    def func(index: int) -> str:
        name, file = frames[index]["name"], str(frames[index].get("file", "?"))
        return f"{name} ({where.sub('', file).replace(str(REPO) + '/', '')}"

    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    lines: Counter[tuple[str, object]] = Counter()
    weight_sum = 0.0
    for profile in doc["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if stack and _waiting_for_work(frames[stack[-1]]):
                continue  # an idle executor thread py-spy's idle filter does not see
            if stack:  # root first, leaf last
                leaf = func(stack[-1])
                weight_sum += weight
                own[leaf] += weight
                lines[leaf, frames[stack[-1]].get("line", "?")] += weight
                total.update(dict.fromkeys({func(i) for i in stack}, weight))
    hottest = {f: line for (f, line), _ in sorted(lines.items(), key=lambda kv: kv[1])}
    pct = 100 / weight_sum
    return [(f"{f}:{hottest[f]})", w * pct, total[f] * pct) for f, w in own.most_common(count)]


def _waiting_for_work(frame: dict[str, object]) -> bool:
    """An executor thread blocked in its queue (`concurrent/futures/thread.py` `_worker`
    as the leaf: any work it does has frames of its own below it)."""
    return frame.get("name") == "_worker" and str(frame.get("file", "")).endswith(
        "concurrent/futures/thread.py"
    )


def pyspy_record(pid: int, seconds: int, out: Path, log_dir: Path, prefix: Sequence[str]) -> Proc:
    """Start `py-spy record` (speedscope) on `pid` for `seconds`; wait for it, then read
    `out` with `speedscope_top`. Idle samples (waiting in the event loop) are left out."""
    pyspy = find_tool("py-spy")
    if pyspy is None:
        raise FileNotFoundError(f"py-spy not found; install with {INSTALL_HINTS['py-spy']}")
    argv = [pyspy, "record", "--pid", str(pid), "--rate", "200", "--duration", str(seconds)]
    return Proc("py-spy", [*prefix, *argv, "--format", "speedscope", "--output", str(out)], log_dir)


def profile_table(top: Sequence[tuple[str, float, float]]) -> str:
    rows = [[str(i), f"`{name}`", f"{own:.1f}", f"{tot:.1f}"] for i, (name, own, tot) in
            enumerate(top, 1)]  # fmt: skip
    return md_table(["#", "function (file:line)", "own %", "total %"], rows)
