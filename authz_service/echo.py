"""A tiny echo upstream: answers every request with 200 and the request it saw, as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from types import TracebackType
from typing import Any, Final

from aiohttp import web

__all__ = ["EchoUpstream", "main"]

# In-flight answers take microseconds; keep stop() quick.
_SHUTDOWN_TIMEOUT: Final = 0.1


class EchoUpstream:
    """HTTP server that echoes method, path and headers back and records every request."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Remember where to listen; nothing listens until start()."""
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None
        # Each entry: {"method", "path", "headers": [(lower-case name, value), ...]} with repeats kept.
        self.requests: list[dict[str, Any]] = []

    async def start(self) -> None:
        """Bind host:port (0 picks an ephemeral port) and serve."""
        if self._runner is not None:
            raise RuntimeError("echo upstream already running")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and drop open connections; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> EchoUpstream:
        """Start and return self."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop."""
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (valid after start)."""
        if self._bound_port is None:
            raise RuntimeError("echo upstream not started")
        return self._bound_port

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT (valid after start)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def headers_named(self, name: str, index: int = -1) -> list[str]:
        """Every value of one header in a recorded request (the last one by default)."""
        wanted = name.lower()
        return [value for header, value in self.requests[index]["headers"] if header == wanted]

    async def _handle(self, request: web.Request) -> web.Response:
        """Record the request and echo it back."""
        headers = [(name.lower(), value) for name, value in request.headers.items()]
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
    async with EchoUpstream(host, port) as echo:
        sys.stdout.write(json.dumps({"url": echo.url}) + "\n")
        sys.stdout.flush()
        await stopping.wait()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: serve the echo upstream."""
    parser = argparse.ArgumentParser(prog="python -m authz_service.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
