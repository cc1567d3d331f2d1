"""The `wa-router` command: serve, demo, check-config, init-config, status, sync.

exit codes: 0 ok; 1 sync found lost or duplicated sessions; 2 config error or port in
use; 3 the router could not be reached; 4 sync could not list every instance.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import statuscli
from .config import Config, load_config
from .errors import ConfigError, PortInUse
from .logging import setup_logging

EXIT_CONFIG = 2


def version() -> str:
    try:
        return importlib.metadata.version("wa-router")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def init_config(path: str, *, force: bool = False) -> int:
    """Write the example (every key, documented) shipped in the package."""
    target = Path(path)
    if target.exists() and not force:
        print(f"wa-router: {path} exists; --force to overwrite it", file=sys.stderr)
        return EXIT_CONFIG
    example = importlib.resources.files("wa_router").joinpath("router.example.yaml")
    target.write_text(example.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"{path}: written; edit instances, then: wa-router check-config {path}")
    return 0


def _load(path: str | None) -> Config:
    return load_config(path, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wa-router", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"wa-router {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the router")
    p_serve.add_argument("-c", "--config", help="YAML config file (default: $WA_ROUTER_CONFIG)")
    p_serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); default 1",
    )
    p_serve.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (default uvloop)",
    )
    p_check = sub.add_parser("check-config", help="validate a config file and exit")
    p_check.add_argument("file")
    p_init = sub.add_parser("init-config", help="write the documented example config")
    p_init.add_argument("path", nargs="?", default="router.yaml", help="default ./router.yaml")
    p_init.add_argument("--force", action="store_true", help="overwrite an existing file")
    p_demo = sub.add_parser("demo", help="4 simulated instances and the router, in one process")
    p_demo.add_argument("--port", type=int, default=8080, help="router port (default 8080)")
    p_demo.add_argument(
        "--instance-port",
        type=int,
        default=3001,
        help="first simulated instance port (default 3001)",
    )
    p_status = sub.add_parser("status", help="a running router's admin status, as a table")
    statuscli.add_client_arguments(p_status)
    p_sync = sub.add_parser(
        "sync",
        help="reconcile a running router's directory with the instances; "
        "exit 1 when sessions are lost or duplicated, 4 when an instance could not be listed",
    )
    statuscli.add_client_arguments(p_sync)
    p_sync.add_argument("--dry-run", action="store_true", help="report, change nothing")
    args = parser.parse_args(argv)

    try:
        if args.command == "check-config":
            cfg = load_config(args.file, os.environ)
            names = ", ".join(i.name for i in cfg.instances)
            print(
                f"{args.file}: OK ({len(cfg.instances)} instances: {names}; "
                f"profile {cfg.profile.name}; store {cfg.store.kind})"
            )
            return 0
        if args.command == "init-config":
            return init_config(args.path, force=args.force)
        if args.command == "serve":
            if args.config is None and "WA_ROUTER_CONFIG" not in os.environ:
                raise ConfigError("", "no config: give -c FILE or set WA_ROUTER_CONFIG")
            cfg = _load(args.config)
            setup_logging(cfg.log)
            from .server import serve_workers

            return serve_workers(
                cfg, workers=args.workers, loop_kind=args.loop, config_path=args.config
            )
        if args.command in ("status", "sync"):
            return statuscli.status(args) if args.command == "status" else statuscli.sync(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(port=args.port, instance_port=args.instance_port)
    except ConfigError as exc:
        print(f"wa-router: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PortInUse as exc:
        print(f"wa-router: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return EXIT_CONFIG  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
