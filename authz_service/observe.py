"""Metrics and decision logs: what happened, never with whom's credentials.

Every value that reaches a log line from a request passes through `redact`, the one place that
decides what of a request may be written down: never a token, a cookie, a secret or a claims
body; the path without its query (queries carry `access_token=` in the wild).
"""

from __future__ import annotations

import hashlib
import logging
import re
import traceback
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from authz_service.model import Decision, HttpRequest, Outcome

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
    def user_id(value: str | None) -> str | None:
        """User ids are not secrets (they go upstream in a header), but they are capped."""
        return None if value is None else value[:128]


class Metrics:
    """Prometheus metrics of one process (registry passed in so tests and workers own theirs)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.checks = Counter(
            "authz_checks",
            "Checks by decision, reason and protocol (grpc: ext_authz Check; http: HTTP mode)",
            ["decision", "reason", "protocol"],
            registry=registry,
        )
        self.latency = Histogram(
            "authz_check_duration_seconds",
            "Check latency inside the service, by protocol",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache_events = Counter(
            "authz_cache_events",
            "Token cache lookups by cache and result (hit, miss, error)",
            ["cache", "event"],
            registry=registry,
        )
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
        self._children: dict[tuple[Outcome, Any, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._cache_children: dict[tuple[str, str], Any] = {}
        self._upstream_children: dict[tuple[str, str], Any] = {}

    def cache_event(self, cache: str, event: str) -> None:
        """Count a cache lookup (label children resolved once: labels() costs ~3 µs a call)."""
        child = self._cache_children.get((cache, event))
        if child is None:
            child = self._cache_children[(cache, event)] = self.cache_events.labels(cache, event)
        child.inc()

    def upstream_call(self, endpoint: str, outcome: str) -> None:
        """Count a call to an identity provider."""
        child = self._upstream_children.get((endpoint, outcome))
        if child is None:
            child = self._upstream_children[(endpoint, outcome)] = self.upstream_calls.labels(endpoint, outcome)
        child.inc()

    def observe(self, decision: Decision, seconds: float, protocol: str = "grpc") -> None:
        """Count a decision and its latency."""
        key = (decision.outcome, decision.reason, protocol)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.checks.labels(decision.outcome.value, decision.reason.label, protocol)
        child.inc()
        latency = self._latency_children.get(protocol)
        if latency is None:
            latency = self._latency_children[protocol] = self.latency.labels(protocol)
        latency.observe(seconds)


def log_decision(
    request: HttpRequest, decision: Decision, seconds: float, level: int | None, protocol: str = "grpc"
) -> None:
    """One structured line per decision, at the configured level (None: off)."""
    if level is None or not decision_log.isEnabledFor(level):
        return
    identity = decision.identity
    decision_log.log(
        level,
        "decision",
        extra={
            "fields": {
                "request_id": redact.identifier(request.request_id),
                "decision": decision.outcome.value,
                "reason": decision.reason.label,
                "introspector": identity.introspector if identity else None,
                "user_id": redact.user_id(identity.user_id) if identity else None,
                "method": request.method,
                "path": redact.path(request.path),
                "latency_ms": round(seconds * 1000, 3),
                "protocol": protocol,
            }
        },
    )


def log_internal_error(err: BaseException) -> None:
    """Log an unexpected error by type and stack only: its message could quote a token."""
    # Locations only, no source lines: even those could carry a literal worth keeping out of logs.
    # The innermost frames only: a deep recursion must not turn into a 60 KB log line.
    stack = traceback.extract_tb(err.__traceback__)[-8:]
    frames = " <- ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(stack))
    log.error("internal error in Check: %s at %s", type(err).__name__, frames)
