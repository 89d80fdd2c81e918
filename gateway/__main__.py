"""Command line: ``avatar-gateway serve [--host H] [--port P] [--log-level L]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from . import __version__
from .config import ConfigError, Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar-gateway",
        description="One streaming avatar, many browsers. Settings also come from "
                    "AVATAR_GATEWAY_* environment variables; flags win.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway (default upstream: local avatar)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port))
                                 if v is not None}
    try:
        settings = Settings.from_env(**overrides)
    except ConfigError as exc:
        print(f"avatar-gateway: {exc}", file=sys.stderr)
        return 2
    from .app import create_app  # heavy imports (aiortc, av) after argument errors

    print(f"avatar-gateway {__version__}: open {settings.base_url}/ to watch the avatar "
          f"and make it speak (Ctrl-C to stop)", flush=True)
    web.run_app(create_app(settings), host=settings.host, port=settings.port,
                print=None, access_log=None, shutdown_timeout=10.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
