"""The `wa-router` command: serve, demo, check-config."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .config import Config, load_config
from .errors import ConfigError
from .logging import setup_logging

EXIT_CONFIG = 2


def _load(path: str | None) -> Config:
    return load_config(path, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wa-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the router")
    p_serve.add_argument("-c", "--config", help="YAML config file (default: $WA_ROUTER_CONFIG)")
    p_check = sub.add_parser("check-config", help="validate a config file and exit")
    p_check.add_argument("file")
    p_demo = sub.add_parser("demo", help="4 simulated instances and the router, in one process")
    p_demo.add_argument("--port", type=int, default=8080, help="router port (default 8080)")
    p_demo.add_argument(
        "--instance-port",
        type=int,
        default=3001,
        help="first simulated instance port (default 3001)",
    )
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
        if args.command == "serve":
            if args.config is None and "WA_ROUTER_CONFIG" not in os.environ:
                raise ConfigError("", "no config: give -c FILE or set WA_ROUTER_CONFIG")
            cfg = _load(args.config)
            setup_logging(cfg.log)
            from .app import serve

            serve(cfg)
            return 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(port=args.port, instance_port=args.instance_port)
    except ConfigError as exc:
        print(f"wa-router: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return EXIT_CONFIG  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
