"""A tiny echo upstream: answers every request with 200 and the request it saw, as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from aiohttp import web

from authz_service.devstack.localhttp import LocalHttpServer

__all__ = ["EchoUpstream", "main"]


class EchoUpstream(LocalHttpServer):
    """HTTP server that echoes method, path and headers back and records every request."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True) -> None:
        """Remember where to listen; nothing listens until start().

        record=False keeps no request log: a long-running echo (the demo, compose, benchmarks)
        must not grow a list of every request it ever answered.
        """
        super().__init__(host, port)
        self._record = record
        # Each entry: {"method", "path", "headers": [(lower-case name, value), ...]} with repeats kept.
        self.requests: list[dict[str, Any]] = []

    def make_app(self) -> web.Application:
        """Every method, every path: echo."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def headers_named(self, name: str, index: int = -1) -> list[str]:
        """Every value of one header in a recorded request (the last one by default)."""
        wanted = name.lower()
        return [value for header, value in self.requests[index]["headers"] if header == wanted]

    async def _handle(self, request: web.Request) -> web.Response:
        """Record the request and echo it back."""
        headers = [(name.lower(), value) for name, value in request.headers.items()]
        if self._record:
            self.requests.append({"method": request.method, "path": request.raw_path, "headers": headers})
        grouped: dict[str, list[str]] = {}
        for name, value in headers:
            grouped.setdefault(name, []).append(value)
        return web.json_response({"method": request.method, "path": request.raw_path, "headers": grouped})


async def _serve(host: str, port: int) -> None:
    """Run until SIGINT or SIGTERM."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    async with EchoUpstream(host, port, record=False) as echo:
        sys.stdout.write(json.dumps({"url": echo.url, "port": echo.port}) + "\n")
        sys.stdout.flush()
        await stopping.wait()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: serve the echo upstream."""
    parser = argparse.ArgumentParser(prog="python -m authz_service.devstack.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
