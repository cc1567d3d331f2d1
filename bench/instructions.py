"""Instructions per request: the router's work for one request, counted by callgrind.

The throughput part times whole proxies, and pywork the router's Python alone, on a shared
machine where the same code varies by a third from one round to the next: a change of a
few percent cannot be seen there. This part counts the instructions the CPU runs instead
(valgrind's callgrind: the same count for the same code and inputs, whatever else the
machine does). The router runs as pywork runs it (lean front, express lane on, uvloop,
in-memory transports, 32 callers, 100 sessions), each count in a fresh process under
callgrind, once with N1 and once with N2 requests after the same warm-up; (I(N2) - I(N1)) /
(N2 - N1) is the count per request, start-up and warm-up cancelling out. Every tree's
bytecode is compiled before, so no run pays for it. `--baseline REV` counts the same for the
router as it was at git revision REV (its `wa_router/`, with this pywork harness).

Instructions are not time (a cache miss costs more than an add), but fewer of them for the
same work is less work: this is the figure to compare two versions of the request path by.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from . import common as c
from .pywork import KINDS
from .throughput import export_rev

COUNTS = (2000, 6000)  # requests measured per run: N1, N2
SMOKE_COUNTS = (200, 600)
DOC_PARAS = (__doc__ or "").split("\n\n")[1:]
# The child: pywork's router, `kind` requests `n` times, with the express lane on.
CHILD = (
    "import sys\n"
    "from bench import pywork\n"
    "r = pywork.measure(sys.argv[1], True, int(sys.argv[2]))\n"
    "sys.exit(1 if r.bad else 0)\n"
)
_COLLECTED = re.compile(r"Collected : (\d+)")


def count(valgrind: str, tree: Path, kind: str, n: int) -> int:
    """Instructions callgrind counted for one run of `n` requests with `tree`'s router."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WA_ROUTER_", "PYTHON"))}
    env |= {"PYTHONPATH": f"{tree}{os.pathsep}{c.REPO}", "PYTHONHASHSEED": "0"}
    argv = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    argv += [sys.executable, "-c", CHILD, kind, str(n)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({kind}, n={n}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_request(valgrind: str, tree: Path, kind: str, counts: tuple[int, int]) -> float:
    n1, n2 = counts
    return (count(valgrind, tree, kind, n2) - count(valgrind, tree, kind, n1)) / (n2 - n1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", metavar="REV", help="also count git revision REV's")
    parser.add_argument("--smoke", action="store_true", help="CI: GET only, 200/600 requests")
    parser.add_argument("--out", type=Path, help="default: bench/results/instructions.md")


def run(args: argparse.Namespace) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("bench instructions: valgrind is not installed", file=sys.stderr)
        return 2
    counts = SMOKE_COUNTS if args.smoke else COUNTS
    kinds = ["GET"] if args.smoke else list(KINDS)
    out = args.out or (
        c.SCRATCH / "instructions-smoke.md" if args.smoke else c.RESULTS / "instructions.md"
    )
    started = time.monotonic()
    with TemporaryDirectory(prefix="wa-instr-") as tmp:
        trees = [("working tree", c.REPO)]
        if args.baseline:
            rev = export_rev(args.baseline, Path(tmp) / "baseline")
            trees.append((f"at {rev}", Path(tmp) / "baseline"))
        for _, tree in trees:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "wa_router"),
                            str(c.REPO / "bench")], check=True, capture_output=True)  # fmt: skip
        got: dict[tuple[str, str], float] = {}
        for kind in kinds:
            for name, tree in trees:
                got[(kind, name)] = per_request(valgrind, tree, kind, counts)
                print(f"{kind:<4} {name:<14} {got[(kind, name)]:>10,.0f} instructions/request",
                      flush=True)  # fmt: skip
    rows = []
    for kind in kinds:
        for name, _ in trees:
            value = got[(kind, name)]
            base = got.get((kind, trees[-1][0])) if len(trees) > 1 else None
            vs = f"{value / base:.3f}x" if base else "-"
            rows.append([kind, name, f"{value:,.0f}", vs])
    head = ["request", "router", "instructions per request", "/ the baseline"]
    lines = [
        "## Instructions per request (callgrind)",
        "",
        f"`python -m bench instructions{' --smoke' if args.smoke else ''}"
        f"{f' --baseline {args.baseline}' if args.baseline else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {(time.monotonic() - started) / 60:.1f} min: "
        f"N1 = {counts[0]:,}, N2 = {counts[1]:,} requests.",
        "",
        *(line for para in DOC_PARAS for line in (" ".join(para.split()), "")),
        c.md_table(head, rows),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
