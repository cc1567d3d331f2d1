"""`python -m bench PART [options]` or `python -m bench all [--smoke]`.

Each part is a module of this package with `add_arguments(parser)` and `run(args) -> int`
that prints its tables and writes `bench/results/<part>.md`; `all` runs every part in one
go (one machine state, one set of versions) and joins the parts into `bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

PARTS = ("throughput", "pywork", "instructions", "failover", "herd", "directory", "webhooks")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def combine(parts: tuple[str, ...] = PARTS) -> Path:
    """bench/RESULTS.md: every part's latest results, in a fixed order."""
    chunks = [
        "# wa-router benchmark results\n",
        "Written by `python -m bench all`; each section by its part "
        "(`python -m bench PART`). Numbers from one machine: compare ratios within "
        "a run, not across machines.\n",
    ]
    for part in parts:
        path = HERE / "results" / f"{part}.md"
        if path.exists():
            chunks.append(path.read_text().strip() + "\n")
        else:
            chunks.append(f"## {part}\n\n(not run yet: `python -m bench {part}`)\n")
    RESULTS.write_text("\n".join(chunks))
    return RESULTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="part", required=True)
    for part in PARTS:
        module = importlib.import_module(f"bench.{part}")
        module.add_arguments(sub.add_parser(part, help=(module.__doc__ or "").split("\n")[0]))
    p_all = sub.add_parser("all", help="every part, then bench/RESULTS.md")
    p_all.add_argument("--smoke", action="store_true", help="a few seconds per part")
    sub.add_parser("combine", help="join bench/results/*.md into bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.part == "combine":
        print(combine())
        return 0
    if args.part != "all":
        code: int = importlib.import_module(f"bench.{args.part}").run(args)
        combine()
        return code
    worst = 0
    for part in PARTS:
        module = importlib.import_module(f"bench.{part}")
        part_parser = argparse.ArgumentParser(prog=f"python -m bench {part}")
        module.add_arguments(part_parser)
        part_args = part_parser.parse_args(["--smoke"] if args.smoke else [])
        started = time.monotonic()
        print(f"== bench {part} ==", flush=True)
        code = module.run(part_args)
        print(f"== bench {part}: exit {code} in {time.monotonic() - started:.0f} s ==", flush=True)
        worst = max(worst, code)
    print(combine())
    return worst


if __name__ == "__main__":
    sys.exit(main())
