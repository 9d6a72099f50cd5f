"""Metrics and decision logs: what happened, never with whom's credentials.

Every value that reaches a log line from a request passes through `redact`, the one place that
decides what of a request may be written down: never a token, a cookie, a secret or a claims
body; the path without its query (queries carry `access_token=` in the wild).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import math
import os
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from authz_service.errors import PolicyTimeout
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason

log = logging.getLogger("authz_service")
decision_log = logging.getLogger("authz_service.decision")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class redact:
    """The one redaction helper: what of a request may appear in a log line."""

    @staticmethod
    def identifier(value: str) -> str:
        """An id the client chose (request id): kept if plainly an id, else only a hash of it."""
        if not value:
            return ""
        if _SAFE_ID.match(value) and not value.startswith("eyJ"):
            return value
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]

    @staticmethod
    def path(value: str) -> str:
        """The request path without its query, capped."""
        return value.partition("?")[0][:256]

    @staticmethod
    def method(value: str) -> str:
        """The request method, capped: nginx and Traefik pass it in X-Forwarded-Method, which a
        client may fill with anything (the longest registered method has 17 characters)."""
        return value[:32]

    @staticmethod
    def user_id(value: str | None) -> str | None:
        """User ids are not secrets (they go upstream in a header), but they are capped."""
        return None if value is None else value[:128]


# prometheus-client's multiprocess mode: set in supervised workers (server/workers.py), whose
# metrics live in files under this directory that the supervisor adds up at each scrape.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The metrics every Check touches: (name, help), shared by both ways of counting them.
_CHECKS = ("authz_checks", "Checks by decision, reason and protocol (grpc: ext_authz Check; http: HTTP mode)")
_LATENCY = ("authz_check_duration_seconds", "Check latency inside the service, by protocol")
_CACHE_EVENTS = ("authz_cache_events", "Token cache lookups by cache and result (hit, miss, error)")
# The histogram's `le` labels, written as prometheus-client writes them ("0.0005" ... "5.0", "+Inf").
_LATENCY_LE = tuple(floatToGoString(bound) for bound in (*_LATENCY_BUCKETS, math.inf))  # type: ignore[no-untyped-call]


class _LoopCounts:
    """The per-Check metrics as plain numbers the loop adds to, turned into metric families when
    the registry is collected (a scrape, served on the same loop).

    prometheus-client's values take a lock per increment and its histogram walks the buckets in
    Python: ~2 µs a Check in a tight loop, ~4.5 µs inside a loaded server, against ~0.5 µs here.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._checks: dict[tuple[Outcome, Reason, str], int] = {}
        # protocol -> a count per bucket (the last one +Inf), then the sum of the seconds
        self._latency: dict[str, list[float]] = {}
        self._cache: dict[tuple[str, str], int] = {}
        registry.register(self)

    def observe(self, decision: Decision, seconds: float, protocol: str) -> None:
        key = (decision.outcome, decision.reason, protocol)
        self._checks[key] = self._checks.get(key, 0) + 1
        latency = self._latency.get(protocol)
        if latency is None:
            latency = self._latency[protocol] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
        latency[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # `le`: the first bound >= seconds
        latency[-1] += seconds

    def cache_event(self, cache: str, event: str) -> None:
        key = (cache, event)
        self._cache[key] = self._cache.get(key, 0) + 1

    def describe(self) -> list[Metric]:
        """The families' names, so the registry refuses a second collector of the same names."""
        return [
            CounterMetricFamily(*_CHECKS),
            HistogramMetricFamily(*_LATENCY),
            CounterMetricFamily(*_CACHE_EVENTS),
        ]

    def collect(self) -> Iterator[Metric]:
        """The three families as they stand (list() copies: a scrape never sees a dict change size)."""
        checks = CounterMetricFamily(*_CHECKS, labels=["decision", "reason", "protocol"])
        for (outcome, reason, protocol), count in list(self._checks.items()):
            checks.add_metric([outcome.value, reason.label, protocol], count)
        yield checks
        latency = HistogramMetricFamily(*_LATENCY, labels=["protocol"])
        for protocol, values in list(self._latency.items()):
            cumulative = itertools.accumulate(values[:-1])
            latency.add_metric([protocol], list(zip(_LATENCY_LE, cumulative, strict=True)), values[-1])
        yield latency
        cache = CounterMetricFamily(*_CACHE_EVENTS, labels=["cache", "event"])
        for labels, count in list(self._cache.items()):
            cache.add_metric(list(labels), count)
        yield cache


class _PrometheusCounts:
    """The per-Check metrics through prometheus-client's own values: in supervised workers only
    they write the files the supervisor reads (label children resolved once: labels() costs ~3 µs)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(*_CHECKS, ["decision", "reason", "protocol"], registry=registry)
        self.latency = Histogram(*_LATENCY, ["protocol"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.cache_events = Counter(*_CACHE_EVENTS, ["cache", "event"], registry=registry)
        self._children: dict[tuple[Outcome, Reason, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._cache_children: dict[tuple[str, str], Any] = {}

    def observe(self, decision: Decision, seconds: float, protocol: str) -> None:
        key = (decision.outcome, decision.reason, protocol)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.checks.labels(decision.outcome.value, decision.reason.label, protocol)
        child.inc()
        latency = self._latency_children.get(protocol)
        if latency is None:
            latency = self._latency_children[protocol] = self.latency.labels(protocol)
        latency.observe(seconds)

    def cache_event(self, cache: str, event: str) -> None:
        child = self._cache_children.get((cache, event))
        if child is None:
            child = self._cache_children[(cache, event)] = self.cache_events.labels(cache, event)
        child.inc()


class Metrics:
    """Prometheus metrics of one process (registry passed in so tests and workers own theirs).

    The three a Check touches (authz_checks, authz_check_duration_seconds, authz_cache_events)
    are counted in plain numbers (`_LoopCounts`), except in supervised workers
    (`PROMETHEUS_MULTIPROC_DIR` set, or `in_files`), where prometheus-client's values count them
    (`_PrometheusCounts`): the same names, labels and buckets either way.
    """

    def __init__(self, registry: CollectorRegistry, *, in_files: bool | None = None) -> None:
        self.registry = registry
        in_files = MULTIPROC_ENV in os.environ if in_files is None else in_files
        per_check = _PrometheusCounts(registry) if in_files else _LoopCounts(registry)
        self._observe = per_check.observe
        self.cache_event: Callable[[str, str], None] = per_check.cache_event
        """Count a token cache lookup (cache name, hit/miss/error)."""
        self.upstream_calls = Counter(
            "authz_upstream_calls",
            "Calls to identity providers by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.jwks_staleness = Gauge(
            "authz_jwks_staleness_seconds",
            "Seconds past cache_ttl of the JWKS keys being served",
            ["introspector"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.jwks_skipped_keys = Counter(
            "authz_jwks_skipped_keys",
            "Unusable keys in fetched JWKS documents, per fetch, by introspector and reason (the log names the kid)",
            ["introspector", "reason"],
            registry=registry,
        )
        self.decision_log_dropped = Counter(
            "authz_decision_log_dropped",
            "Decision log lines dropped because the writer was behind (a stalled log reader)",
            registry=registry,
        )
        self._dropped_seen = 0
        self._upstream_children: dict[tuple[str, str], Any] = {}

    def upstream_call(self, endpoint: str, outcome: str) -> None:
        """Count a call to an identity provider."""
        child = self._upstream_children.get((endpoint, outcome))
        if child is None:
            child = self._upstream_children[(endpoint, outcome)] = self.upstream_calls.labels(endpoint, outcome)
        child.inc()

    def jwks_skipped_key(self, introspector: str, reason: str) -> None:
        """Count a JWKS key we could not use (tokens/keys.py SkippedKey reasons)."""
        self.jwks_skipped_keys.labels(introspector, reason).inc()

    def observe(self, decision: Decision, seconds: float, protocol: str = "grpc") -> None:
        """Count a decision and its latency."""
        self._observe(decision, seconds, protocol)
        writer = _writer
        if writer is not None and writer.dropped != self._dropped_seen:
            # Counted here, on the loop, rather than by the writer: metrics of supervised workers
            # live in files that only a Counter updates.
            self.decision_log_dropped.inc(writer.dropped - self._dropped_seen)
            self._dropped_seen = writer.dropped


class ApiMetrics:
    """The resource API's writes, by writer (the `api.tokens` name), resource type and action
    (create, update, delete): who changed what, to alert on and to compare with the audit lines."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.writes = Counter(
            "authz_api_writes",
            "Resources changed through the resource API, by writer (api.tokens name), type and action",
            ["writer", "type", "action"],
            registry=registry,
        )
        self.allow_everything = Counter(
            "authz_api_allow_everything_writes",
            "AccessPolicies written through the resource API whose rule allows every request, by writer",
            ["writer"],
            registry=registry,
        )

    def write(self, writer: str, kind: str, action: str) -> None:
        """Count one resource created, updated or deleted."""
        self.writes.labels(writer, kind, action).inc()


def decision_fields(request: HttpRequest, decision: Decision, seconds: float, protocol: str) -> dict[str, Any]:
    """What a decision line says, every request value through `redact`."""
    identity = decision.identity
    return {
        "request_id": redact.identifier(request.request_id),
        "decision": decision.outcome.value,
        "reason": decision.reason.label,
        "introspector": identity.introspector if identity else None,
        "user_id": redact.user_id(identity.user_id) if identity else None,
        "method": redact.method(request.method),
        "path": redact.path(request.path),
        "latency_ms": round(seconds * 1000, 3),
        "protocol": protocol,
        "policy": decision.policy,
    }


def iso_timestamp(created: float) -> str:
    """`2026-11-29T21:40:01.123Z`, as every log line has it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


# What the loop hands the writer for one line (DecisionWriter.submit): the request's id, method and
# path, not the request (the identity is the cached one). A queued line waits up to ~50 ms for the
# writer's next batch, and a stalled log reader lets 10,000 of them wait: each request held with its
# headers dict and header strings was ~2.7 KB (26.6 MB for a full queue), these are ~350 bytes.
DecisionItem = tuple[float, int, str, str, str, Outcome, Reason, Identity | None, str | None, float, str]


class DecisionWriter:
    """Decision lines off the event loop: Check hands a small tuple to a bounded queue, a thread
    formats and writes them in batches. A full queue drops the line and counts it; it never blocks,
    so a stalled log reader (a full pipe, a slow collector) slows no check.
    """

    def __init__(self, fd: int, min_level: int, max_queue: int = 10_000, idle: float = 0.05) -> None:
        self._fd = fd
        self.min_level = min_level
        self._queue: deque[DecisionItem] = deque()
        self._max_queue = max_queue
        self._idle = idle
        self.dropped = 0
        self.written = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)

    def start(self) -> DecisionWriter:
        self._thread.start()
        return self

    def submit(
        self, created: float, level: int, request: HttpRequest, decision: Decision, seconds: float, protocol: str
    ) -> None:
        """On the loop: enqueue what the line says (about 0.3 µs), or drop and count when the writer
        is behind. The request's id, method and path, not the request: see DecisionItem."""
        if len(self._queue) < self._max_queue:
            self._queue.append(
                (
                    created,
                    level,
                    request.request_id,
                    request.method,
                    request.path,
                    decision.outcome,
                    decision.reason,
                    decision.identity,
                    decision.policy,
                    seconds,
                    protocol,
                )
            )
        else:
            self.dropped += 1

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most `timeout` seconds) and end the thread."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        # One batch, then sleep `idle` even when more lines are waiting: the thread takes the GIL
        # about 100 times a second, not at every moment the loop releases it. Writing as soon as a
        # line arrives made the two threads trade the GIL at every syscall of the loop, and cost
        # gRPC Check 15% of its throughput; batching keeps the writer's share near its own ~4 µs a line.
        queue = self._queue
        while True:
            if queue:
                lines: list[str] = []
                while queue and len(lines) < 1000:
                    lines.append(_render(*queue.popleft()))
                self._write(lines)
                if len(queue) > self._max_queue // 2 or self._stopping.is_set():
                    continue  # behind, or flushing before exit: no pause
            elif self._stopping.is_set():
                return
            time.sleep(self._idle)

    def _write(self, lines: list[str]) -> None:
        # Chunks of at most PIPE_BUF bytes: each os.write of whole lines lands in one piece, never
        # interleaved with another thread's log line.
        chunk = b""
        for line in lines:
            data = line.encode("utf-8", "replace") + b"\n"
            if chunk and len(chunk) + len(data) > _PIPE_BUF:
                self._write_all(chunk)
                chunk = b""
            chunk += data
        if chunk:
            self._write_all(chunk)
        self.written += len(lines)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = os.write(self._fd, view)
            except OSError:
                return  # the reader is gone: nothing to tell it
            view = view[sent:]


_PIPE_BUF = 4096
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}
_writer: DecisionWriter | None = None


# The C string encoder json.dumps itself uses (ensure_ascii=False): ~0.1 µs a string.
_quote: Any = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
_second_prefix: tuple[int, str] = (-1, "")
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # the timestamp's tail, by milliseconds


def _render(
    created: float,
    level: int,
    request_id: str,
    method: str,
    path: str,
    outcome: Outcome,
    reason: Reason,
    identity: Identity | None,
    policy: str | None,
    seconds: float,
    protocol: str,
) -> str:
    """The JSON line JsonFormatter would write for decision_fields(...), built by hand: the writer
    thread holds the GIL while it formats, so every microsecond here is taken from Check (9 µs with
    a dict and json.dumps, ~2.2 µs like this). tests/integration/test_decision_log.py checks the two agree."""
    global _second_prefix
    second = int(created)
    if _second_prefix[0] != second:
        _second_prefix = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    introspector = _quote(identity.introspector) if identity else "null"
    user = identity.user_id if identity else None
    return (
        f'{{"ts": "{_second_prefix[1]}{_MILLIS[int((created - second) * 1000)]}", '
        f'"level": "{_LEVEL_NAMES.get(level, "info")}", "logger": "authz_service.decision", "msg": "decision", '
        f'"request_id": {_quote(redact.identifier(request_id))}, '
        f'"decision": "{outcome._value_}", "reason": "{reason.label}", '
        f'"introspector": {introspector}, '
        f'"user_id": {_quote(redact.user_id(user)) if user is not None else "null"}, '
        f'"method": {_quote(redact.method(method))}, "path": {_quote(redact.path(path))}, '
        f'"latency_ms": {round(seconds * 1000, 3)!r}, "protocol": {_quote(protocol)}, '
        f'"policy": {_quote(policy) if policy is not None else "null"}}}'
    )


def start_decision_writer(fd: int, min_level: int) -> DecisionWriter:
    """Send decision lines to `fd` through a writer thread from now on (the service's processes)."""
    global _writer
    stop_decision_writer()
    _writer = DecisionWriter(fd, min_level).start()
    return _writer


def stop_decision_writer() -> None:
    """Flush and stop the writer; decision lines go through stdlib logging again."""
    global _writer
    writer, _writer = _writer, None
    if writer is not None:
        writer.stop()


def decision_writer() -> DecisionWriter | None:
    """The running writer, if any (for its dropped-lines count)."""
    return _writer


def log_decision(
    request: HttpRequest, decision: Decision, seconds: float, level: int | None, protocol: str = "grpc"
) -> None:
    """One structured line per decision, at the configured level (None: off).

    In the service's processes a DecisionWriter formats and writes it on its own thread; elsewhere
    (tools, in-process tests) it goes through stdlib logging.
    """
    if level is None:
        return
    if decision.path is not None:
        request = request._replace(path=decision.path)  # what the policies judged, not what was sent
    writer = _writer
    if writer is not None:
        if level >= writer.min_level:
            writer.submit(time.time(), level, request, decision, seconds, protocol)
        return
    if decision_log.isEnabledFor(level):
        decision_log.log(level, "decision", extra={"fields": decision_fields(request, decision, seconds, protocol)})


def log_internal_error(err: BaseException) -> None:
    """Log an unexpected error by type and stack only: its message could quote a token."""
    # Locations only, no source lines: even those could carry a literal worth keeping out of logs.
    # The innermost frames only: a deep recursion must not turn into a 60 KB log line.
    stack = traceback.extract_tb(err.__traceback__)[-8:]
    frames = " <- ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(stack))
    log.error("internal error in Check: %s at %s", type(err).__name__, frames)


def log_policy_timeout(err: PolicyTimeout) -> None:
    """Log a policy that ran past its time budget: the policy and rule part, never the value."""
    log.warning(
        "policy evaluation timed out; request denied", extra={"fields": {"policy": err.policy, "rule": err.what}}
    )
