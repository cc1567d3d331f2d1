"""Simulated instances in a process of their own (the directory bench's sync runs them), so
listing their sessions does not take CPU from the router being measured.

    python -m bench._simhost INSTANCES SESSIONS_TOTAL

Starts INSTANCES sims on free loopback ports, spreads SESSIONS_TOTAL connected sessions over
them round-robin, prints one JSON line `{"urls": [...]}`, and runs until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys

from ._harness import API_KEY, run_loop, session_ids, start_sims, stop_sims


async def serve(instances: int, total: int) -> None:
    sims = await start_sims(instances)
    try:
        for i, sid in enumerate(session_ids(total, seed=5)):
            sims[i % instances].add_session(sid)
        print(json.dumps({"urls": [s.url for s in sims], "api_key": API_KEY}), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    finally:
        await stop_sims(sims)


def main(argv: list[str]) -> int:
    run_loop(serve(int(argv[1]), int(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
