"""The HTTP floor: an aiohttp server on uvloop that answers every request 200 with an empty body.

The same stack as the service's HTTP mode (aiohttp's low-level server, one handler, no router,
no access log, the event loop authz_service.loop picks) and nothing else, so `checks/s of an HTTP
scenario / checks/s of this` is the share of Python's HTTP/1.1 ceiling the service keeps.

    python bench/noop_http_server.py --port 0     # prints {"port": N} once listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web
from aiohttp.web_request import BaseRequest


async def answer(request: BaseRequest) -> web.StreamResponse:
    """The whole handler: 200, no body."""
    return web.Response()


async def serve(host: str, port: int) -> None:
    server = web.Server(answer, access_log=None, handler_cancellation=False)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = int(runner.addresses[0][1])
    sys.stdout.write(json.dumps({"port": bound}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        # The event loop the service picks (uvloop when installed; AUTHZ_EVENT_LOOP=asyncio opts out).
        from authz_service.loop import run
    except ImportError:
        run = asyncio.run
    run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
