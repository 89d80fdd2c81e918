"""Command line: ``avatar-gateway serve|sim [--host H] [--port P] [--log-level L]`` and
``avatar-gateway config-reference [--update FILE]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from . import __version__, logs
from .config import ConfigError, Settings, base_url, is_loopback


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
    sim = commands.add_parser(
        "sim", help="run HeyGen-in-a-box: HeyGen + LiveAvatar APIs and a LiveKit server, "
                    "locally (settings from AVATAR_GATEWAY_SIM_* variables)")
    sim.add_argument("--host", help="address to bind (default 127.0.0.1)")
    sim.add_argument("--port", type=int, help="port to bind (default 8090)")
    sim.add_argument("--tls-port", type=int,
                     help="also serve TLS on this port (HeyGen's browser SDK needs 443)")
    sim.add_argument("--tls-cert", help="PEM certificate for --tls-port (default: self-signed)")
    sim.add_argument("--tls-key", help="PEM key of --tls-cert (default: in the certificate file)")
    sim.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"])
    reference = commands.add_parser(
        "config-reference", help="print every setting (variable, default, meaning) as Markdown")
    reference.add_argument("--update", metavar="FILE",
                           help="rewrite the table between the config-reference markers in FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config-reference":
        return _config_reference(args.update)
    overrides: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port))
                                 if v is not None}
    if args.command == "sim":
        logs.configure(args.log_level)
        overrides.update({k: v for k, v in (("tls_port", args.tls_port),
                                            ("tls_cert", args.tls_cert),
                                            ("tls_key", args.tls_key)) if v is not None})
        return _sim(overrides)
    try:
        settings = Settings.from_env(**overrides)
    except ConfigError as exc:
        print(f"avatar-gateway: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level, settings.log_format)
    if (settings.allow_insecure and not settings.api_token and not settings.admin_token
            and not is_loopback(settings.host)):
        # Said at every start: anyone who reaches this address may drive the avatar and spend
        # the provider credits.
        logging.getLogger("gateway").warning(
            "serving %s WITHOUT authentication (AVATAR_GATEWAY_ALLOW_INSECURE=1): anyone who "
            "can reach it may create sessions and spend provider credits", settings.host)
    from .app import create_app  # heavy imports (aiortc, av) after argument errors

    print(f"avatar-gateway {__version__}: open {settings.base_url}/ to watch the avatar "
          f"and make it speak (Ctrl-C to stop)", flush=True)
    try:
        asyncio.run(_serve(create_app(settings), settings))
    except OSError as exc:  # the port taken, or an address this host does not have
        print(f"avatar-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(app: web.Application, settings: Settings) -> None:
    """``web.run_app``'s startup and graceful shutdown (SIGINT/SIGTERM: readiness 503, drain,
    close), with the listener behind :class:`~gateway.connections.ConnectionGuard`: connection
    caps and request deadlines apply before aiohttp reads a byte."""
    from .api.common import METRICS
    from .connections import (
        AcceptErrorLog,
        ConnectionGuard,
        ConnectionLimits,
        accept_batch,
        connection_cap,
        raise_fd_limit,
    )
    from .runtime import freeze_heap
    from .viewers.aiortc_hooks import prepare_peer_connections

    log = logging.getLogger("gateway")
    before, fd_limit = raise_fd_limit()
    cap = connection_cap(settings.max_connections, fd_limit)
    backlog = accept_batch(fd_limit, cap)
    log.info("file descriptors: limit %d%s; at most %d HTTP connections, %d per client "
             "address; accepting %d at a time", fd_limit,
             f" (raised from {before})" if fd_limit != before else "", cap,
             settings.max_connections_per_client, backlog)
    if cap >= fd_limit:
        log.warning("max_connections %d is not below the descriptor limit %d: the listener can "
                    "run out of descriptors", cap, fd_limit)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10.0,
                           keepalive_timeout=settings.keepalive_timeout)
    server: asyncio.Server | None = None
    try:
        await runner.setup()  # startup hooks (orphan reaping) run before the port opens
        await prepare_peer_connections()
        freeze_heap()
        assert runner.server is not None
        guard = ConnectionGuard(runner.server, ConnectionLimits(
            max_total=cap, max_per_client=settings.max_connections_per_client,
            header_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
        ), app[METRICS])
        AcceptErrorLog(loop, metrics=app[METRICS], connections=lambda: guard.open).install(loop)
        server = await loop.create_server(guard, settings.host, settings.port,
                                           backlog=backlog)
        await stop.wait()
    finally:
        if server is not None:
            server.close()  # no new connections while the open ones drain
        await runner.cleanup()


def _config_reference(update: str | None) -> int:
    from pathlib import Path

    from .config_reference import reference_markdown
    from .config_reference import update as update_file

    if update is None:
        print(reference_markdown(), end="")
        return 0
    try:
        changed = update_file(Path(update))
    except (OSError, ValueError) as exc:
        print(f"avatar-gateway config-reference: {exc}", file=sys.stderr)
        return 2
    print(f"{update}: {'updated' if changed else 'already up to date'}")
    return 0


def _sim(overrides: dict[str, Any]) -> int:
    from .sim.config import (
        DEFAULT_HEYGEN_API_KEY,
        DEFAULT_LIVEAVATAR_API_KEY,
        SIM_ENV_PREFIX,
        SimSettings,
    )

    try:
        settings = SimSettings.from_env(**overrides)
    except ConfigError as exc:
        print(f"avatar-gateway sim: {exc}", file=sys.stderr)
        return 2
    from .sim.app import create_sim_app  # heavy imports (aiortc, livekit) after argument errors
    from .sim.heygen_tls import server_context

    tls = None
    if settings.tls_port:
        from urllib.parse import urlsplit

        try:
            tls = server_context(settings.tls_cert, settings.tls_key,
                                 names=(settings.host, urlsplit(settings.public_url).hostname or ""))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            print(f"avatar-gateway sim: TLS: {exc}", file=sys.stderr)
            return 2

    def shown(name: str, key: str, default: str) -> str:
        # The defaults are the simulator's own public test keys; keys a user chose stay hidden.
        return default if key == default else f"(from {SIM_ENV_PREFIX}{name.upper()})"

    base = settings.base_url
    livekit = "ws" + base.removeprefix("http")
    heygen_key = shown("heygen_api_key", settings.heygen_api_key.reveal(), DEFAULT_HEYGEN_API_KEY)
    liveavatar_key = shown("liveavatar_api_key", settings.liveavatar_api_key.reveal(),
                           DEFAULT_LIVEAVATAR_API_KEY)
    tls_line = ""
    if settings.tls_port:
        host = base_url(settings.host, settings.tls_port).removeprefix("http://")
        tls_line = (f"\n  TLS (same routes):    https://{host}   "
                    f"({'certificate ' + settings.tls_cert if settings.tls_cert else 'self-signed'}"
                    f"; HeyGen's web SDK needs port 443)")
    print(f"avatar-gateway sim {__version__}: HeyGen-in-a-box on {base} (Ctrl-C to stop)\n"
          f"  HeyGen API base:      {base}   x-api-key: {heygen_key}\n"
          f"  LiveAvatar API base:  {base}   X-API-KEY: {liveavatar_key}\n"
          f"  LiveKit server:       {livekit}   (the 'url' the session APIs return)\n"
          f"  Session ledger:       {base}/sim/ledger   (faults: {base}/sim/faults)"
          f"{tls_line}",
          flush=True)
    app = create_sim_app(settings)
    if tls is None:
        web.run_app(app, host=settings.host, port=settings.port,
                    print=None, access_log=None, shutdown_timeout=10.0)
    else:
        try:
            asyncio.run(_serve_sim(app, settings.host, settings.port, settings.tls_port, tls))
        except OSError as exc:  # a port taken, or 443 without the right to bind it
            print(f"avatar-gateway sim: {exc}", file=sys.stderr)
            return 1
    return 0


async def _serve_sim(app: web.Application, host: str, port: int, tls_port: int,
                     tls: ssl.SSLContext) -> None:
    """``web.run_app`` with a second, TLS, listener (run_app serves one SSL context for all
    of its sockets): until SIGINT or SIGTERM, then the same graceful shutdown."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        await web.TCPSite(runner, host, tls_port, ssl_context=tls).start()
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
