"""HTTP mode: the same decisions for Envoy's HTTP ext_authz, Istio's envoyExtAuthzHttp, nginx
`auth_request` and Traefik `forwardAuth`, on `server.http_address`.

- `<any method> /ext_authz/<original path>`: Envoy's http_service with `path_prefix: /ext_authz`;
  the method, path (with query) and headers are the original request's.
- `<any method> /forward_auth`: nginx and Traefik; the original request is described by
  X-Forwarded-Method / X-Original-Method, X-Forwarded-Uri / X-Original-URI, X-Forwarded-Host /
  Host and X-Forwarded-Proto. A proxy sets one of each pair, once: a request whose pair disagrees,
  or that repeats one, carries a client's own header and is refused (400 `conflicting_original`).
- `GET /healthz`, `GET /readyz`: liveness and readiness on the same listener.

Like the gRPC servicer this only converts (request -> HttpRequest, Decision -> HttpAnswer); the
Authorizer decides. It runs on aiohttp's low-level server: one handler, no router, no middleware,
because every microsecond here is a microsecond of every request behind the proxy.

A request aiohttp cannot parse never reaches the handler; `_Connection.handle_error` answers it as
every other denial (JSON body, `www-authenticate`, `x-authz-error`) instead of aiohttp's plain-text
400, which would quote the offending header (a token) and log it: a header over the size limit is
431 `headers_too_large`, or 401 `too_large` when it is a Bearer token; anything else 400.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDictProxy

from authz_service.engine import Engine
from authz_service.envoy import HttpAnswer
from authz_service.errors import bind_failure, host_port
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.observe import Metrics, log_decision, log_internal_error

EXT_AUTHZ_PREFIX = "/ext_authz"
FORWARD_AUTH = "/forward_auth"
PROTOCOL = "http"
_INTERNAL_ERROR = Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)
_NO_URI = Decision(Outcome.INVALID_REQUEST, Reason.NO_ORIGINAL_URI)
_CONFLICTING = Decision(Outcome.INVALID_REQUEST, Reason.CONFLICTING_ORIGINAL)
_HEADERS_TOO_LARGE = Decision(Outcome.INVALID_REQUEST, Reason.HEADERS_TOO_LARGE)
_TOKEN_TOO_LARGE = Decision(Outcome.UNAUTHENTICATED, Reason.TOO_LARGE)
_UNPARSABLE = Decision(Outcome.INVALID_REQUEST, Reason.UNDECODABLE_REQUEST)
# RFC 6585: what a header over the limit is answered with (the body says `invalid_request`).
HEADERS_TOO_LARGE_STATUS = 431
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


# What describes the original request (Traefik's X-Forwarded-*, nginx's X-Original-*): a proxy
# sets one of each pair, once.
_ORIGINAL_HEADERS = ("x-forwarded-uri", "x-original-uri", "x-forwarded-method", "x-original-method")


def forward_auth_request(request: BaseRequest, headers: dict[str, str], peer: str) -> HttpRequest | Decision:
    """The original request, from nginx's or Traefik's X-Forwarded-* / X-Original-* headers; a
    denial when the proxy did not say which URI it asks about, or when those headers disagree."""
    raw = request.headers
    if any(len(raw.getall(name, ())) > 1 for name in _ORIGINAL_HEADERS):
        return _CONFLICTING  # repeated: a client's own value besides the proxy's
    forwarded_uri, original_uri = headers.get("x-forwarded-uri"), headers.get("x-original-uri")
    if forwarded_uri and original_uri and forwarded_uri != original_uri:
        return _CONFLICTING
    forwarded_method, original_method = headers.get("x-forwarded-method"), headers.get("x-original-method")
    if forwarded_method and original_method and forwarded_method.upper() != original_method.upper():
        return _CONFLICTING
    uri = forwarded_uri or original_uri
    if not uri:
        return _NO_URI
    method = forwarded_method or original_method or request.method
    return HttpRequest(
        method=method.upper(),
        path=uri,
        host=headers.get("x-forwarded-host") or headers.get("host", ""),
        scheme=headers.get("x-forwarded-proto", "http"),
        headers=headers,
        remote_addr=client_address(headers, peer),
        request_id=headers.get("x-request-id", ""),
    )


def unparsable(error: HttpProcessingError) -> Decision:
    """The denial for a request aiohttp could not parse."""
    if isinstance(error, LineTooLong) or "too many headers" in error.message.lower():
        # aiohttp quotes the start of what was too long: the value (its C parser) or the header
        # line (its Python parser). A Bearer token is judged as a token (401), as Check judges one.
        start = error.args[0] if error.args else b""
        start = bytes(start).lower() if isinstance(start, bytes | bytearray) else str(start).lower().encode()
        if start.startswith((b"bearer ", b"authorization:")):
            return _TOKEN_TOO_LARGE
        return _HEADERS_TOO_LARGE
    return _UNPARSABLE


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

    @property
    def address(self) -> str:
        """Where it listens (the bound port once started)."""
        return host_port(self._host, self.port or self._port)

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
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop accepting; checks in flight get `shutdown_grace` seconds."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        # Routed by the target as sent: aiohttp's `path` resolves dot segments, and Envoy sends
        # `/ext_authz` + the original path as it is (`/ext_authz/../admin` is a check of `/../admin`).
        if request.raw_path.startswith(EXT_AUTHZ_PREFIX) and request.raw_path[10:11] in ("", "/", "?"):
            return await self._check(request, ext_authz_request)
        path = request.path
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
        self, request: BaseRequest, convert: Callable[[BaseRequest, dict[str, str], str], HttpRequest | Decision]
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
                if isinstance(original, Decision):
                    decision = original  # the proxy's description of the request is missing or contradicts itself
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

    def _refuse(self, error: HttpProcessingError) -> web.Response:
        """The answer to a request aiohttp could not parse: counted and logged as every denial."""
        engine = self._engine()
        decision = unparsable(error)
        answer = engine.http_answers.answer(decision)
        if decision is _HEADERS_TOO_LARGE:
            answer = answer._replace(status=HEADERS_TOO_LARGE_STATUS)
        self._metrics.observe(decision, 0.0, PROTOCOL)
        log_decision(_EMPTY_REQUEST, decision, 0.0, engine.config.logging.decisions, PROTOCOL)
        return _response(answer)


def _response(answer: HttpAnswer) -> web.Response:
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body or None)


def _peer(request: BaseRequest) -> str:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""
