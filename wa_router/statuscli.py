"""The HTTP-client side of `wa-router status` and `wa-router sync`: ask a running router's
admin API and print the answer for a person (status) or for cron (sync).

Exit codes, so cron can alert on them:

    0  done; for sync: no session lost or duplicated
    1  sync: sessions are lost (rescan the QR) or duplicated (on two instances)
    2  config error (raised as ConfigError, reported by cli.py)
    3  the router could not be reached, or answered an error
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from yarl import URL

from .config import load_config
from .errors import ConfigError

EXIT_OK = 0
EXIT_SYNC_PROBLEMS = 1
EXIT_UNREACHABLE = 3
EXIT_SYNC_INCOMPLETE = 4
STATUS_TIMEOUT_S = 10.0
# A sync lists every instance (Node gives a listing up to 60 s) and may wait for a sync
# already running.
SYNC_TIMEOUT_S = 150.0
_LAST_ERROR_WIDTH = 48


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML config file (default: $WA_ROUTER_CONFIG)")
    parser.add_argument(
        "--url", help="the router's base URL (default: http://server.host:server.port)"
    )
    parser.add_argument("--token", help="the admin token (default: admin.token of the config)")


class RouterError(Exception):
    """The router could not be asked, or answered an error: exit 3."""


# -- where and how to ask ------------------------------------------------------------------


def base_url(host: str, port: int) -> str:
    """The URL to reach a server bound to host:port from this machine: a wildcard bind
    (0.0.0.0, ::) is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return str(URL.build(scheme="http", host=host, port=port))


def resolve_target(
    config: str | None, url: str | None, token: str | None, env: Mapping[str, str]
) -> tuple[str, str]:
    """The base URL and token to use: the flags, else the config (file and env overrides)."""
    if url is None or token is None:
        if config is None and "WA_ROUTER_CONFIG" not in env:
            raise ConfigError("", "give -c FILE (or set WA_ROUTER_CONFIG), or --url and --token")
        cfg = load_config(config, env)
        url = url or base_url(cfg.server.host, cfg.server.port)
        token = token or cfg.admin.token
        if token is None:
            raise ConfigError("admin.token", "is not set, so the admin API is off: set it")
    return url.rstrip("/"), token


async def call_admin(
    method: str, url: str, token: str, *, timeout_s: float, params: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One admin request; its JSON answer, or RouterError with what went wrong."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, headers=headers, params=params) as resp,
        ):
            body = await resp.read()
            status = resp.status
    except TimeoutError:
        raise RouterError(f"{url}: no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise RouterError(f"cannot reach the router at {url}: {exc}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise RouterError(f"{url} answered HTTP {status}, not a JSON object")
    if status != 200:
        code = doc.get("error", f"HTTP {status}")
        raise RouterError(f"{url} answered {status} {code}: {doc.get('message', '')}".rstrip())
    return doc


# -- pure formatting -----------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def render_status(doc: Mapping[str, Any], now: float) -> str:
    """`GET /admin/status` as a table of instances plus a few summary lines."""
    header = (
        "instance",
        "state",
        "draining",
        "sessions",
        "latency ms",
        "last check age s",
        "last error",
    )
    rows = []
    for inst in doc.get("instances", []):
        checked = inst.get("last_check_at")
        error = inst.get("last_error") or ""
        if len(error) > _LAST_ERROR_WIDTH:
            error = error[: _LAST_ERROR_WIDTH - 3] + "..."
        rows.append(
            [
                _cell(inst.get("name")),
                _cell(inst.get("state")),
                _cell(inst.get("draining")),
                _cell(inst.get("sessions")),
                _cell(inst.get("latency_ms")),
                _cell(None if checked is None else max(0.0, now - float(checked))),
                error or "-",
            ]
        )
    lines = render_table(header, rows)
    lines.append("")
    d = doc.get("directory", {})
    lines.append(
        f"directory: {d.get('size', 0)} sessions, cache hit ratio "
        f"{float(d.get('cache_hit_ratio', 0.0)):.2f} ({d.get('cache_hits', 0)} cache, "
        f"{d.get('store_hits', 0)} store, {d.get('misses', 0)} misses)"
    )
    disc = doc.get("discovery", {})
    lines.append(
        f"rediscovery: {disc.get('scans', 0)} scans, {disc.get('found', 0)} found, "
        f"{disc.get('not_found', 0)} not found, {disc.get('negative_hits', 0)} negative hits"
    )
    sync = doc.get("sync")
    if sync is None:
        lines.append("sync: none yet")
    else:
        age = max(0.0, now - float(sync.get("started_at", now)))
        lines.append(f"sync: {sync.get('summary', '')} ({age:.0f} s ago)")
    hooks = doc.get("webhooks") or {}
    backlog = hooks.get("backlog")
    lines.append(
        f"webhooks: {hooks.get('accepted', 0)} accepted, {hooks.get('relayed', 0)} relayed"
        + ("" if backlog is None else f", backlog {backlog}")
    )
    lines.append(f"ready: {_cell(doc.get('ready'))}")
    return "\n".join(lines)


def unlisted(doc: Mapping[str, Any]) -> dict[str, str]:
    """Instances the sync could not list (refused, down, slow), with why."""
    return {k: str(v) for k, v in (doc.get("instances") or {}).items() if v != "ok"}


def sync_exit_code(doc: Mapping[str, Any]) -> int:
    if doc.get("lost") or doc.get("duplicated"):
        return EXIT_SYNC_PROBLEMS
    # What was not listed was not checked: a cron job must hear of it.
    return EXIT_SYNC_INCOMPLETE if unlisted(doc) else EXIT_OK


# -- the commands --------------------------------------------------------------------------


def _fail(exc: RouterError) -> int:
    print(f"wa-router: {exc}", file=sys.stderr)
    return EXIT_UNREACHABLE


def status(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    url, token = resolve_target(
        args.config, args.url, args.token, os.environ if env is None else env
    )
    try:
        doc = asyncio.run(
            call_admin("GET", f"{url}/admin/status", token, timeout_s=STATUS_TIMEOUT_S)
        )
    except RouterError as exc:
        return _fail(exc)
    print(render_status(doc, time.time()))
    return EXIT_OK


def sync(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    url, token = resolve_target(
        args.config, args.url, args.token, os.environ if env is None else env
    )
    params = {"dry_run": "1" if args.dry_run else "0"}
    try:
        doc = asyncio.run(
            call_admin("POST", f"{url}/admin/sync", token, timeout_s=SYNC_TIMEOUT_S, params=params)
        )
    except RouterError as exc:
        return _fail(exc)
    for line in doc.get("lines", []):
        print(line)
    missing = unlisted(doc)
    if missing:
        names = ", ".join(sorted(missing))
        print(f"wa-router: sync incomplete: could not list {names}", file=sys.stderr)
    return sync_exit_code(doc)
