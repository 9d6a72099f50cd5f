"""HTTP mode on granian (`server.http_engine: granian`): the listener of server/http.py, with the
same routes, adapters (`httpmode`), `CheckRunner`, answers, metrics, decision log and readiness,
served by granian's Rust HTTP/1.1 server embedded in this process, on this process's event loop.

granian reads requests and writes answers on its own Rust thread (the GIL released), and hands
each request to the loop as one coroutine; everything a check does (the engine, the caches, the
metrics, the decision log) is the one the gRPC listener and the admin server share. Why embedded
rather than as granian's own worker processes: docs/design.md, "HTTP mode on granian".

granian's ASGI interface, not RSGI: an RSGI scope has only the percent-decoded path (`/a%2Fb` and
`/a/b` read alike, `%2e%2e` reads as `..`), so paths.py could no longer judge the target as sent
(its refusals of `%2F`, `%2E`, `%00`, ...), and it leaves out header values that are not UTF-8,
a repeated X-Forwarded-Uri among them. ASGI's `raw_path` and byte headers are what was received.

Limits, as server/http.py answers them: a header value or a request target over 8,190 bytes
(aiohttp's limit) is a check refused as every denial, counted and logged: 401 `too_large` for a
Bearer token, else 431 `headers_too_large`. granian refuses by itself, with its own empty answer
and before any check (not counted): more than 100 header fields or a head over its buffer (431),
and a request it cannot parse (400). None of these is ever an allow.

The embedding drives granian's `ASGIWorker` as `granian.server.embed` does (2.8), on a socket
bound here (our SO_REUSEPORT for workers, port 0, the bind error named as every listener's).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import granian
from granian import _futures, _granian
from granian._granian import WorkerSignal
from granian.http import HTTP1Settings

from authz_service.envoy import ALLOW_MEMO_ENTRIES, HttpAnswer
from authz_service.errors import bind_failure, host_port
from authz_service.httpmode import (
    Route,
    ext_authz_joined,
    ext_authz_request,
    forward_auth_joined,
    forward_auth_request,
    route,
    too_large,
)
from authz_service.model import Decision, HttpRequest
from authz_service.server.runner import OVERLOADED, HttpListener

__all__ = ["MAX_FIELD", "Embedded", "GranianHttpServer"]

BACKLOG = 1024
# aiohttp's max_field_size and max_line_size: a longer header value or target is refused the same way.
MAX_FIELD = 8190

# granian's compiled module, typed by stubs older than its 2.8 signatures (ASGIWorker, SocketHolder).
_GRANIAN: Any = _granian
# Answers kept as ASGI messages: as many as HttpAnswers keeps built (its allows, plus the denials).
ENCODED_ANSWERS = 2 * ALLOW_MEMO_ENTRIES
_JSON = (b"content-type", b"application/json; charset=utf-8")
_Message = dict[str, Any]


# What the adapters read of one ASGI request: method, target as sent, headers, peer. The headers
# are joined by name (httpmode's *_joined adapters) when none came twice, else the pairs as received.
_Read = tuple[str, str, dict[str, str] | list[tuple[str, str]], str]


def _ext_authz(request: _Read) -> HttpRequest:
    method, target, headers, peer = request
    if isinstance(headers, dict):
        return ext_authz_joined(method, target, headers, peer)
    return ext_authz_request(method, target, headers, peer)


def _forward_auth(request: _Read) -> HttpRequest | Decision:
    method, target, headers, peer = request
    if isinstance(headers, dict):
        return forward_auth_joined(method, target, headers, peer)
    return forward_auth_request(method, target, headers, peer)


def _target(scope: Mapping[str, Any]) -> bytes:
    """The request target as received: the path undecoded, and the query when there is one."""
    raw_path: bytes = scope["raw_path"]
    query: bytes = scope["query_string"]
    return raw_path + b"?" + query if query else raw_path


def _oversized(target: bytes, headers: list[tuple[bytes, bytes]]) -> Decision | None:
    """The denial of a request with a header value or target over MAX_FIELD bytes, else None."""
    if len(target) > MAX_FIELD:
        return too_large(target[:100])
    for _, value in headers:
        if len(value) > MAX_FIELD:
            return too_large(value[:100])
    return None


def _start(answer: HttpAnswer) -> tuple[_Message, _Message]:
    """An HttpAnswer as ASGI's two messages."""
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in answer.headers]
    return (
        {"type": "http.response.start", "status": answer.status, "headers": headers},
        {"type": "http.response.body", "body": answer.body},
    )


def _json(status: int, body: Mapping[str, Any]) -> tuple[_Message, _Message]:
    return (
        {"type": "http.response.start", "status": status, "headers": [_JSON]},
        {"type": "http.response.body", "body": json.dumps(body).encode()},
    )


_NOT_FOUND = _json(404, {"error": "not_found"})
_ALIVE = _json(200, {"status": "alive"})


class GranianHttpServer(HttpListener):
    """The HTTP-mode listener on granian: checks, plus /healthz and /readyz (see HttpAuthServer)."""

    # The overload bound is judged where granian hands a request over (on its thread), not where
    # the request's task starts: a cached check never suspends, so CheckRunner.in_flight stays at 1
    # while thousands of requests wait in the loop's queue, and by the time a request runs, those
    # ahead of it are done. Handed over minus finished is how many wait or run ahead of it.
    handed_over = 0  # requests granian handed over (the last ticket + 1)
    finished = 0  # requests answered (or failed), counted on the loop
    _served: Embedded | None = None

    async def start(self) -> int:
        """Bind and serve; the bound port."""
        # granian's own info lines ("Started worker-1" in every process) say less than our "serving" line.
        logging.getLogger("_granian").setLevel(logging.WARNING)
        sock = self._bind()
        self.port = int(sock.getsockname()[1])
        self._tickets = itertools.count()  # next() is atomic, whichever granian thread takes one
        self._encoded: dict[int, tuple[HttpAnswer, _Message, _Message]] = {}
        # granian queues requests past this many in progress: above the overload bound, so that
        # past max_concurrent_checks a check reaches the loop and its fast 503 rather than waiting.
        backpressure = max(2 * self._max_concurrent_checks, BACKLOG)
        self._served = Embedded(sock, self._handed_over, backpressure)
        return self.port

    def _bind(self) -> socket.socket:
        address = host_port(self._host, self._port)
        try:
            info = socket.getaddrinfo(self._host or None, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
                0
            ]
        except OSError as err:
            raise bind_failure(address, err) from err
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(info[4])
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise bind_failure(address, err) from err
        return sock

    async def stop(self) -> None:
        """Stop accepting; checks in flight get `shutdown_grace` seconds."""
        served, self._served = self._served, None
        if served is not None:
            await served.stop(self._shutdown_grace)

    def _handed_over(self, watcher: Any) -> Awaitable[None]:
        """granian's callback for one request, on granian's thread: the coroutine that serves it."""
        ticket = next(self._tickets)
        self.handed_over = ticket + 1
        return self._watch(watcher, ticket - self.finished >= self._max_concurrent_checks)

    async def _watch(self, watcher: Any, overloaded: bool) -> None:
        """Serve one request (`overloaded`: it came with max_concurrent_checks ahead of it), then
        tell granian how it ended."""
        try:
            await self._serve(watcher.scope, watcher.proto.send, overloaded)
        except BaseException as err:
            watcher.err(err)
            return
        finally:
            self.finished += 1
        watcher.done()

    def _messages(self, answer: HttpAnswer) -> tuple[_Message, _Message]:
        """The answer as ASGI's messages, built once per answer: the engine's HttpAnswers hands out
        the same object for the same identity or denial, so its headers are encoded once, not per check."""
        kept = self._encoded.get(id(answer))
        if kept is None or kept[0] is not answer:  # (kept holds the answer: its id is not reused meanwhile)
            if len(self._encoded) >= ENCODED_ANSWERS:
                self._encoded.clear()
            kept = self._encoded[id(answer)] = (answer, *_start(answer))
        return kept[1], kept[2]

    async def _serve(self, scope: Mapping[str, Any], send: Callable[[_Message], Any], overloaded: bool) -> None:
        """Answer one request; past the overload bound a check is answered 503 `overloaded`
        unread (the health endpoints are still answered: a busy service is alive, and ready)."""
        raw_target = _target(scope)
        target = raw_target.decode("utf-8", "surrogateescape")
        match route(target):
            case Route.EXT_AUTHZ | Route.FORWARD_AUTH if overloaded:
                start, body = self._messages(self.runner.refuse(OVERLOADED))
            case Route.EXT_AUTHZ:
                read = _read(scope, raw_target, target)
                checked = (
                    self.runner.refuse(read)
                    if isinstance(read, Decision)
                    else await self.runner.check(_ext_authz, read)
                )
                start, body = self._messages(checked)
            case Route.FORWARD_AUTH:
                read = _read(scope, raw_target, target)
                checked = (
                    self.runner.refuse(read)
                    if isinstance(read, Decision)
                    else await self.runner.check(_forward_auth, read)
                )
                start, body = self._messages(checked)
            case Route.HEALTHZ:
                start, body = _ALIVE
            case Route.READYZ:
                start, body = _json(*self.readiness())
            case _:
                start, body = _NOT_FOUND
        await send(start)
        await send(body)


def _read(scope: Mapping[str, Any], raw_target: bytes, target: str) -> _Read | Decision:
    """What the adapters read of an ASGI request, or the denial of a header or target over MAX_FIELD."""
    raw: list[tuple[bytes, bytes]] = scope["headers"]
    if len(raw_target) <= MAX_FIELD:
        # One pass into the dict the adapters read: names are lower-case ASCII (granian's parser,
        # as ASGI asks), values nearly always UTF-8. A header that came twice, or a value that is
        # not UTF-8, takes the general way below (rare).
        headers: dict[str, str] = {}
        try:
            for name, value in raw:
                if len(value) > MAX_FIELD:
                    return too_large(value[:100])
                key = name.decode()
                if key in headers:
                    break
                headers[key] = value.decode()
            else:
                return (scope["method"], target, headers, scope["client"][0])
        except UnicodeDecodeError:
            pass
    refused = _oversized(raw_target, raw)
    if refused is not None:
        return refused
    try:
        pairs = [(name.decode(), value.decode()) for name, value in raw]
    except UnicodeDecodeError:  # as aiohttp reads them
        pairs = [(name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in raw]
    return (scope["method"], target, pairs, scope["client"][0])


class Embedded:
    """granian serving a listening socket on the running loop: `callback(watcher)` is awaited for
    each request (`watcher.scope`, `watcher.proto.send`; then `watcher.done()` or `watcher.err(e)`)."""

    def __init__(self, sock: socket.socket, callback: Callable[[Any], Awaitable[None]], backpressure: int) -> None:
        loop = asyncio.get_running_loop()
        stopped: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            if not stopped.done():
                stopped.set_result(None)

        def on_stopped() -> None:  # granian's thread, once its connections are done
            loop.call_soon_threadsafe(done)

        signal = WorkerSignal()
        signal.add_cb(on_stopped)
        try:
            worker = _worker(_GRANIAN.SocketHolder(sock.fileno(), False, BACKLOG), backpressure)
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the worker owns the descriptor now, and closes it when it stops
        scheduler = _futures._new_cbscheduler(loop, callback, impl_asyncio=True)  # type: ignore[no-untyped-call]
        worker.serve_async(scheduler, loop, signal)
        self._signal, self._stopped = signal, stopped

    async def stop(self, grace: float) -> None:
        """Stop accepting; what is in progress gets `grace` seconds."""
        self._signal.set()  # granian closes the listener, finishes the requests in progress, then calls back
        # What still runs after the grace is cut off as the process ends, as aiohttp's runner cuts it off.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._stopped), grace)


def _worker(sock: Any, backpressure: int) -> Any:
    """granian's ASGI worker for one listening socket: HTTP/1.1, one Rust thread, no TLS."""
    try:
        # The arguments granian.server.embed passes (granian 2.8): id, (spec, socket), ipc,
        # runtime threads, blocking threads (Rust, Python), their idle timeout, backpressure, HTTP
        # mode, HTTP/1 and HTTP/2 settings, websockets, static files, TLS (8 fields), metrics.
        return _GRANIAN.ASGIWorker(
            1,
            (None, sock),
            None,
            1,
            512,
            1,
            30,
            backpressure,
            "1",
            HTTP1Settings(),
            None,
            False,
            None,
            False,
            None,
            None,
            None,
            "tls1.3",
            None,
            [],
            False,
            (None, None),
        )
    except TypeError as err:
        raise RuntimeError(
            f"granian {granian.__version__}: its embedded worker takes other arguments than granian 2.8's; "
            "set server.http_engine: aiohttp"
        ) from err
