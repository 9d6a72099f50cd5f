"""One Check, whatever the protocol: convert, decide, answer, count, log; never raise.

Every shell (server/grpc.py, server/http.py) hands a check to its `CheckRunner` with the pure
adapter that reads it (`envoy.decode_check`, `httpmode.ext_authz_request`, ...) and writes back
what the runner returns (encoded CheckResponse bytes, an `HttpAnswer`) with its own framework. So
the fail-closed wrapper, the overload bound, the metrics and the decision log are written once.
No aiohttp or grpc here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from authz_service.config.model import Listen
from authz_service.envoy import HttpAnswer, http_denial
from authz_service.errors import host_port
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.redact import redact

if TYPE_CHECKING:
    from authz_service.engine import Engine

INTERNAL_ERROR = Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)
OVERLOADED = Decision(Outcome.UNAVAILABLE, Reason.OVERLOADED)
# What the decision log shows for a check refused before it could be read.
_EMPTY_REQUEST = HttpRequest()

Answer = TypeVar("Answer")
Raw = TypeVar("Raw")


class CheckMetrics(Protocol):
    """Where a decision and its latency are counted (metrics.Metrics)."""

    def observe(self, decision: Decision, seconds: float, protocol: str) -> None: ...


class DecisionLog(Protocol):
    """Writes one decision line at `level` (None: off); decisionlog.DecisionLog.log_decision."""

    def __call__(
        self, request: HttpRequest, decision: Decision, seconds: float, level: int | None, protocol: str
    ) -> None: ...


class CheckRunner(Generic[Answer]):
    """Runs the checks of one protocol's listener, and counts those in flight.

    `answer(engine, decision, request)` is the protocol's Decision -> answer (`request`: the
    original one, empty when it could not be read; the `responses` block's templates quote it);
    `internal_error` is its answer to a check that failed unexpectedly, built once, so that
    failing closed needs nothing that could fail again. `max_in_flight`: past that many checks in
    flight a check is answered 503 `overloaded` at once (None: the server bounds them itself, as grpc does).
    """

    def __init__(
        self,
        protocol: str,
        engine: Callable[[], Engine],
        metrics: CheckMetrics,
        log_decision: DecisionLog,
        log_internal_error: Callable[[BaseException], None],
        *,
        answer: Callable[[Engine, Decision, HttpRequest], Answer],
        internal_error: Answer,
        max_in_flight: int | None = None,
    ) -> None:
        self.protocol = protocol
        self._engine = engine  # read once per check: a reload swaps it between checks, never during one
        self._metrics = metrics
        self._log_decision = log_decision
        self._log_internal_error = log_internal_error
        self._answer = answer
        self._internal_error = internal_error
        self._max_in_flight = sys.maxsize if max_in_flight is None else max_in_flight
        self.in_flight = 0  # checks started and not yet answered

    async def check(self, convert: Callable[[Raw], HttpRequest | Decision], raw: Raw) -> Answer:
        """The answer to one check: `convert(raw)` reads it (or refuses it), the Authorizer decides."""
        started = time.perf_counter()
        engine = self._engine()
        http = _EMPTY_REQUEST
        self.in_flight += 1
        try:
            if self.in_flight > self._max_in_flight:
                # Bounded queueing: a fast 503 rather than a wait behind thousands of checks.
                decision = OVERLOADED
            else:
                original = convert(raw)
                if isinstance(original, Decision):
                    decision = original  # the request does not say what it asks, or contradicts itself
                else:
                    http = original
                    spans = engine.spans
                    if spans is None:
                        decision = await engine.authorizer.check(http)
                    else:
                        request_id = redact.identifier(http.request_id)
                        decision = await spans.check(engine.authorizer.check, http, self.protocol, request_id)
            answer = self._answer(engine, decision, http)
        except Exception as err:  # fail closed, keep serving
            self._log_internal_error(err)
            decision = INTERNAL_ERROR
            answer = self._internal_error
        finally:
            self.in_flight -= 1
        return self._finish(engine, http, decision, answer, time.perf_counter() - started)

    def refuse(self, decision: Decision) -> Answer:
        """The answer to a check refused before it was read (unparsable, its caller gone), counted
        and logged as every decision, with no latency of its own."""
        engine = self._engine()
        try:
            answer = self._answer(engine, decision, _EMPTY_REQUEST)
        except Exception as err:  # fail closed, keep serving
            self._log_internal_error(err)
            decision = INTERNAL_ERROR
            answer = self._internal_error
        return self._finish(engine, _EMPTY_REQUEST, decision, answer, 0.0)

    def _finish(self, engine: Engine, http: HttpRequest, decision: Decision, answer: Answer, seconds: float) -> Answer:
        try:
            self._metrics.observe(decision, seconds, self.protocol)
            self._log_decision(http, decision, seconds, engine.config.logging.decisions, self.protocol)
        except Exception as err:
            # No answer goes out without its count and its decision line: an allow that cannot be
            # accounted for is an internal error.
            self._log_internal_error(err)
            return self._internal_error
        return answer


HTTP_PROTOCOL = "http"  # the `protocol` label of HTTP mode's checks, whichever server carries them


def _http_answer(engine: Engine, decision: Decision, request: HttpRequest) -> HttpAnswer:
    # The request: a `responses` block's templates quote it, and its Accept picks the redirect.
    return engine.http_answers.answer(decision, request)


def http_runner(
    engine: Callable[[], Engine],
    metrics: CheckMetrics,
    log_decision: DecisionLog,
    log_internal_error: Callable[[BaseException], None],
    max_in_flight: int,
) -> CheckRunner[HttpAnswer]:
    """HTTP mode's runner, the same for the aiohttp and the granian server: HttpAnswer out, the
    internal-error denial precomputed, past `max_in_flight` checks 503 at once."""
    return CheckRunner(
        HTTP_PROTOCOL,
        engine,
        metrics,
        log_decision,
        log_internal_error,
        answer=_http_answer,
        internal_error=http_denial(INTERNAL_ERROR.outcome, INTERNAL_ERROR.reason),
        max_in_flight=max_in_flight,
    )


SHUTDOWN_TIMEOUT = 10.0  # an HTTP listener's default drain


class HttpListener:
    """What both HTTP-mode servers (server/http.py on aiohttp, server/http_granian.py on granian)
    are built from and answer alike: where they listen, their runner, readiness, the drain."""

    def __init__(
        self,
        listen: Listen,
        engine: Callable[[], Engine],
        metrics: CheckMetrics,
        ready: Callable[[], bool],
        *,
        details: Callable[[], Mapping[str, Any]] = dict,
        log_decision: DecisionLog,
        log_internal_error: Callable[[BaseException], None],
        reuse_port: bool = False,
        shutdown_grace: float = SHUTDOWN_TIMEOUT,
        max_concurrent_checks: int = 2048,
    ) -> None:
        self._host = listen.host
        self._port = listen.port
        self.runner = http_runner(engine, metrics, log_decision, log_internal_error, max_concurrent_checks)
        self._max_concurrent_checks = max_concurrent_checks
        self._ready = ready
        self._details = details  # what /readyz says besides its status (each introspector's keys, the store)
        self._reuse_port = reuse_port
        self._shutdown_grace = shutdown_grace
        self.port: int | None = None

    @property
    def address(self) -> str:
        """Where it listens (the bound port once started)."""
        return host_port(self._host, self.port or self._port)

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """/readyz: its status and JSON body."""
        return readiness(self._ready, self._details)


def readiness(ready: Callable[[], bool], details: Callable[[], Mapping[str, Any]]) -> tuple[int, dict[str, Any]]:
    """The answer of every listener's /readyz (HTTP mode's and the admin server's): 200 or 503,
    and a JSON body of the status and `details` (each introspector's keys, the resource store)."""
    # Ready read first: details read after it may only be newer (an introspector shown with keys
    # in a 503 is one that got them meanwhile, never the other way round).
    is_ready = ready()
    return (200 if is_ready else 503), {"status": "ready" if is_ready else "not_ready", **details()}
