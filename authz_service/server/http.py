"""HTTP mode: the same decisions for Envoy's HTTP ext_authz, Istio's envoyExtAuthzHttp, nginx
`auth_request` and Traefik `forwardAuth`, on `server.http_address`.

- `<any method> /ext_authz/<original path>` and `<any method> /forward_auth`: checks, read by the
  pure adapter `httpmode` (what each route means is written there) and run by the `CheckRunner`.
- `GET /healthz`, `GET /readyz`: liveness and readiness on the same listener.

This shell only hands over aiohttp's method, target, header pairs and peer, and writes back the
runner's `HttpAnswer`. It runs on aiohttp's low-level server: one handler, no router, no
middleware, because every microsecond here is a microsecond of every request behind the proxy.

A request aiohttp cannot parse never reaches the handler; `_Connection.handle_error` answers it as
every other denial (JSON body, `www-authenticate`, `x-authz-error`) instead of aiohttp's plain-text
400, which would quote the offending header (a token) and log it: a header over the size limit is
431 `headers_too_large`, or 401 `too_large` when it is a Bearer token; anything else 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest

from authz_service.envoy import HttpAnswer
from authz_service.errors import bind_failure, host_port
from authz_service.httpmode import (
    EXT_AUTHZ_PREFIX,
    FORWARD_AUTH,
    UNPARSABLE,
    Route,
    ext_authz_request,
    forward_auth_request,
    route,
    too_large,
)
from authz_service.model import Decision, HttpRequest
from authz_service.server.runner import HttpListener

__all__ = ["EXT_AUTHZ_PREFIX", "FORWARD_AUTH", "HttpAuthServer", "unparsable"]


def unparsable(error: HttpProcessingError) -> Decision:
    """The denial for a request aiohttp could not parse."""
    if isinstance(error, LineTooLong) or "too many headers" in error.message.lower():
        # aiohttp quotes the start of what was too long: the value (its C parser) or the header
        # line (its Python parser).
        start = error.args[0] if error.args else b""
        return too_large(bytes(start) if isinstance(start, bytes | bytearray) else str(start).encode())
    return UNPARSABLE


def _peer(request: BaseRequest) -> str:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def _ext_authz(request: BaseRequest) -> HttpRequest:
    return ext_authz_request(request.method, request.raw_path, request.headers.items(), _peer(request))


def _forward_auth(request: BaseRequest) -> HttpRequest | Decision:
    return forward_auth_request(request.method, request.raw_path, request.headers.items(), _peer(request))


class _Connection(web.RequestHandler):
    """aiohttp's protocol for one connection, answering a request it cannot parse as a denial."""

    def __init__(self, manager: web.Server, refuse: Callable[[HttpProcessingError], web.Response]) -> None:
        # access_log=None: no access log (aiohttp reads None so, though it types the argument Logger).
        super().__init__(manager, loop=asyncio.get_running_loop(), access_log=None)  # type: ignore[arg-type]
        self._refuse = refuse

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # Not aiohttp's answer: its text and its log line quote the offending header, a token maybe.
        response = self._refuse(exc)
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's low-level server, with connections that answer parse errors as denials."""

    def __init__(
        self,
        handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
        refuse: Callable[[HttpProcessingError], web.Response],
    ) -> None:
        super().__init__(handler, handler_cancellation=False)
        self._refuse = refuse

    def __call__(self) -> web.RequestHandler:
        return _Connection(self, self._refuse)


class HttpAuthServer(HttpListener):
    """The HTTP-mode listener on aiohttp: checks, plus /healthz and /readyz."""

    _web: web.ServerRunner | None = None

    async def start(self) -> int:
        """Bind and serve; the bound port."""
        server = _Server(self._handle, self._refuse)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=self._shutdown_grace)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_port=self._reuse_port, backlog=1024)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise bind_failure(host_port(self._host, self._port), err) from err
        self._web = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop accepting; checks in flight get `shutdown_grace` seconds."""
        runner, self._web = self._web, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        match route(request.raw_path):
            case Route.EXT_AUTHZ:
                return _response(await self.runner.check(_ext_authz, request))
            case Route.FORWARD_AUTH:
                return _response(await self.runner.check(_forward_auth, request))
            case Route.HEALTHZ:
                return web.json_response({"status": "alive"})
            case Route.READYZ:
                status, body = self.readiness()
                return web.json_response(body, status=status)
        return web.json_response({"error": "not_found"}, status=404)

    def _refuse(self, error: HttpProcessingError) -> web.Response:
        """The answer to a request aiohttp could not parse: counted and logged as every denial."""
        return _response(self.runner.refuse(unparsable(error)))


def _response(answer: HttpAnswer) -> web.Response:
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body or None)
