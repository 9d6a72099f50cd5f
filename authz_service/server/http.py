"""HTTP mode: the same decisions for Envoy's HTTP ext_authz, Istio's envoyExtAuthzHttp, nginx
`auth_request` and Traefik `forwardAuth`, on `server.http_address`.

- `<any method> /ext_authz/<original path>`: Envoy's http_service with `path_prefix: /ext_authz`;
  the method, path (with query) and headers are the original request's.
- `<any method> /forward_auth`: nginx and Traefik; the original request is described by
  X-Forwarded-Method / X-Original-Method, X-Forwarded-Uri / X-Original-URI, X-Forwarded-Host /
  Host and X-Forwarded-Proto.
- `GET /healthz`, `GET /readyz`: liveness and readiness on the same listener.

Like the gRPC servicer this only converts (request -> HttpRequest, Decision -> HttpAnswer); the
Authorizer decides. It runs on aiohttp's low-level server: one handler, no router, no middleware,
because every microsecond here is a microsecond of every request behind the proxy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDictProxy

from authz_service.engine import Engine
from authz_service.envoy import HttpAnswer
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.observe import Metrics, log_decision, log_internal_error

EXT_AUTHZ_PREFIX = "/ext_authz"
FORWARD_AUTH = "/forward_auth"
PROTOCOL = "http"
_INTERNAL_ERROR = Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)
_NO_URI = Decision(Outcome.INVALID_REQUEST, Reason.NO_ORIGINAL_URI)
_OVERLOADED = Decision(Outcome.UNAVAILABLE, Reason.OVERLOADED)
_EMPTY_REQUEST = HttpRequest()
SHUTDOWN_TIMEOUT = 10.0


def _headers(raw: CIMultiDictProxy[str]) -> dict[str, str]:
    """Lower-case names; a repeated header joined with "," (as Envoy does for gRPC checks)."""
    headers: dict[str, str] = {}
    for name, value in raw.items():
        key = name.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def client_address(headers: dict[str, str], peer: str) -> str:
    """The client's address: the last X-Forwarded-For entry (the one the proxy in front of us
    added itself: Envoy with use_remote_address, nginx's $proxy_add_x_forwarded_for, Traefik), else
    the peer. Entries a client sends itself come before it, so they are never read."""
    forwarded = headers.get("x-forwarded-for")
    if forwarded:
        return forwarded.rpartition(",")[2].strip()
    return peer


def ext_authz_request(request: BaseRequest, headers: dict[str, str], peer: str) -> HttpRequest:
    """The original request, from Envoy's http_service check (path_prefix /ext_authz)."""
    path = request.raw_path[len(EXT_AUTHZ_PREFIX) :] or "/"
    if path.startswith("?"):
        path = "/" + path
    return HttpRequest(
        method=request.method,
        path=path,
        host=headers.get("host", ""),
        scheme=headers.get("x-forwarded-proto", "http"),
        headers=headers,
        remote_addr=client_address(headers, peer),
        request_id=headers.get("x-request-id", ""),
    )


def forward_auth_request(request: BaseRequest, headers: dict[str, str], peer: str) -> HttpRequest | None:
    """The original request, from nginx's or Traefik's X-Forwarded-* / X-Original-* headers; None
    when the proxy did not say which URI it asks about."""
    uri = headers.get("x-forwarded-uri") or headers.get("x-original-uri")
    if not uri:
        return None
    method = headers.get("x-forwarded-method") or headers.get("x-original-method") or request.method
    return HttpRequest(
        method=method.upper(),
        path=uri,
        host=headers.get("x-forwarded-host") or headers.get("host", ""),
        scheme=headers.get("x-forwarded-proto", "http"),
        headers=headers,
        remote_addr=client_address(headers, peer),
        request_id=headers.get("x-request-id", ""),
    )


class HttpAuthServer:
    """The HTTP-mode listener: checks, plus /healthz and /readyz."""

    def __init__(
        self,
        address: str,
        engine: Callable[[], Engine],
        metrics: Metrics,
        ready: Callable[[], bool],
        *,
        reuse_port: bool = False,
        shutdown_grace: float = SHUTDOWN_TIMEOUT,
        max_concurrent_checks: int = 2048,
    ) -> None:
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._engine = engine  # read once per check: a reload swaps it between checks, never during one
        self._metrics = metrics
        self._ready = ready
        self._reuse_port = reuse_port
        self._shutdown_grace = shutdown_grace
        self._max_concurrent = max_concurrent_checks
        self._in_flight = 0
        self._runner: web.ServerRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and serve; the bound port."""
        server = web.Server(self._handle, access_log=None, handler_cancellation=False)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=self._shutdown_grace)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_port=self._reuse_port, backlog=1024)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop accepting; checks in flight get `shutdown_grace` seconds."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith(EXT_AUTHZ_PREFIX) and (len(path) == len(EXT_AUTHZ_PREFIX) or path[10] == "/"):
            return await self._check(request, ext_authz_request)
        if path == FORWARD_AUTH:
            return await self._check(request, forward_auth_request)
        if path == "/healthz":
            return web.json_response({"status": "alive"})
        if path == "/readyz":
            if self._ready():
                return web.json_response({"status": "ready"})
            return web.json_response({"status": "not ready"}, status=503)
        return web.json_response({"error": "not_found"}, status=404)

    async def _check(
        self, request: BaseRequest, convert: Callable[[BaseRequest, dict[str, str], str], HttpRequest | None]
    ) -> web.Response:
        started = time.perf_counter()
        engine = self._engine()
        http = _EMPTY_REQUEST
        self._in_flight += 1
        try:
            if self._in_flight > self._max_concurrent:
                # Bounded queueing: a fast 503 rather than a wait behind thousands of checks.
                decision = _OVERLOADED
            else:
                headers = _headers(request.headers)
                original = convert(request, headers, _peer(request))
                if original is None:
                    decision = _NO_URI
                else:
                    http = original
                    decision = await engine.authorizer.check(http)
            answer = engine.http_answers.answer(decision)
        except Exception as err:  # fail closed, keep serving
            log_internal_error(err)
            decision = _INTERNAL_ERROR
            answer = engine.http_answers.answer(decision)
        finally:
            self._in_flight -= 1
        elapsed = time.perf_counter() - started
        self._metrics.observe(decision, elapsed, PROTOCOL)
        log_decision(http, decision, elapsed, engine.config.logging.decisions, PROTOCOL)
        return _response(answer)


def _response(answer: HttpAnswer) -> web.Response:
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body or None)


def _peer(request: BaseRequest) -> str:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""
