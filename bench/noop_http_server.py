"""The HTTP floors: a server on uvloop that answers every request 200 with an empty body.

The same stack as the service's HTTP mode and nothing else (no router, no access log, the event
loop authz_service.loop picks), so `checks/s of an HTTP scenario / checks/s of this` is the share
of that server's HTTP/1.1 ceiling the service keeps:

- `--engine aiohttp` (the default): aiohttp's low-level server, one handler (server/http.py's stack);
- `--engine granian`: granian's ASGI worker embedded on the loop (server/http_granian.py's stack).

    python bench/noop_http_server.py --port 0     # prints {"port": N} once listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web
from aiohttp.web_request import BaseRequest


async def answer(request: BaseRequest) -> web.StreamResponse:
    """The whole handler: 200, no body."""
    return web.Response()


_START = {"type": "http.response.start", "status": 200, "headers": []}
_BODY = {"type": "http.response.body", "body": b""}


async def granian_answer(watcher: Any) -> None:
    """The whole handler on granian: 200, no body (as GranianHttpServer sends an answer)."""
    send = watcher.proto.send
    await send(_START)
    await send(_BODY)
    watcher.done()


async def serve(host: str, port: int, engine: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if engine == "granian":
        from authz_service.server.http_granian import BACKLOG, Embedded

        sock = socket.create_server((host, port), backlog=BACKLOG)
        sock.setblocking(False)
        bound = int(sock.getsockname()[1])
        served = Embedded(sock, granian_answer, 4096)
        _say(bound)
        await stop.wait()
        await served.stop(1.0)
        return
    server = web.Server(answer, access_log=None, handler_cancellation=False)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    _say(int(runner.addresses[0][1]))
    await stop.wait()
    await runner.cleanup()


def _say(port: int) -> None:
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--engine", choices=("aiohttp", "granian"), default="aiohttp")
    args = parser.parse_args()
    try:
        # The event loop the service picks (uvloop when installed; AUTHZ_EVENT_LOOP=asyncio opts out).
        from authz_service.loop import run
    except ImportError:
        run = asyncio.run
    run(serve(args.host, args.port, args.engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
