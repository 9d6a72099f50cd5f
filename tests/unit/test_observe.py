"""observe: the one redaction point, decision logs that never carry credentials, and metrics."""

from __future__ import annotations

import itertools
import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from authz_service.logs import JsonFormatter
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.observe import ApiMetrics, Metrics, log_decision, log_internal_error, redact
from tests.unit.fakes import EcSigner

JWT = EcSigner("k1").sign({"iss": "https://idp", "sub": "user-1", "exp": 2_000_000_000})
OPAQUE = "tok_7f3a9c2e4b1d8f6a0c5e7b9d1f3a5c7e"


def rendered(record: logging.LogRecord) -> str:
    """The line the service writes for a record (its JSON formatter: message and structured fields)."""
    return JsonFormatter().format(record)


# --------------------------------------------------------------------------- redact


@pytest.mark.parametrize("value", ["req-1", "9f8e7d6c-1234-5678-9abc-def012345678", "a.b:c_d-e"])
def test_plain_request_ids_are_kept(value: str) -> None:
    assert redact.identifier(value) == value


def test_empty_request_id_stays_empty() -> None:
    assert redact.identifier("") == ""


@pytest.mark.parametrize(
    "value",
    [
        JWT,  # a JWT passed as a request id
        "eyJhbGciOiJIUzI1NiJ9",  # anything that starts like one
        "Bearer abc",  # spaces
        "x" * 129,  # too long for an id
        "id\nforged log line",
    ],
)
def test_suspicious_request_ids_become_a_hash(value: str) -> None:
    redacted = redact.identifier(value)
    assert redacted.startswith("sha256:")
    assert value not in redacted
    assert redacted == redact.identifier(value)  # stable: log lines of one request still correlate


def test_path_loses_its_query() -> None:
    assert redact.path(f"/fhir/Patient?access_token={OPAQUE}&_count=10") == "/fhir/Patient"


def test_path_is_capped() -> None:
    assert redact.path("/" + "a" * 1000) == "/" + "a" * 255
    assert redact.method("UPDATEREDIRECTREF") == "UPDATEREDIRECTREF"
    assert redact.method("M" * 6000) == "M" * 32  # X-Forwarded-Method is whatever a client sends


def test_user_id_is_capped_not_hidden() -> None:
    assert redact.user_id("user-1") == "user-1"
    assert redact.user_id("u" * 500) == "u" * 128
    assert redact.user_id(None) is None


# --------------------------------------------------------------------------- decision log


def request_with_credentials() -> HttpRequest:
    # curl -H "Authorization: Bearer $JWT" -H "Cookie: sid=$OPAQUE" -H "x-request-id: $JWT" \
    #   "http://api.example.com/fhir/Patient?access_token=$OPAQUE"
    return HttpRequest(
        method="GET",
        path=f"/fhir/Patient?access_token={OPAQUE}",
        host="api.example.com",
        headers={"authorization": f"Bearer {JWT}", "cookie": f"sid={OPAQUE}", "x-request-id": JWT},
        request_id=JWT,
    )


@pytest.mark.parametrize(
    "decision",
    [
        Decision(
            Outcome.ALLOW,
            Reason.ALLOWED,
            Identity("user-1", {"sub": "user-1", "secret": OPAQUE}, "idp", "jwt"),
            ("x-user-id", "user-1"),
        ),
        Decision(Outcome.UNAUTHENTICATED, Reason.BAD_SIGNATURE),
        Decision(Outcome.UNAVAILABLE, Reason.IDP_UNAVAILABLE),
    ],
)
def test_decision_line_never_carries_a_credential(caplog: pytest.LogCaptureFixture, decision: Decision) -> None:
    with caplog.at_level(logging.INFO, logger="authz_service.decision"):
        log_decision(request_with_credentials(), decision, 0.0012, logging.INFO)
    [record] = caplog.records
    text = rendered(record)
    assert JWT not in text
    assert OPAQUE not in text
    assert "access_token" not in text


def test_decision_line_fields(caplog: pytest.LogCaptureFixture) -> None:
    identity = Identity("user-1", {"sub": "user-1"}, "idp", "jwt")
    decision = Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, identity)
    request = HttpRequest(method="POST", path="/admin?x=1", request_id="req-42")
    with caplog.at_level(logging.INFO, logger="authz_service.decision"):
        log_decision(request, decision, 0.0025, logging.INFO)
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert getattr(record, "fields") == {  # noqa: B009  # `fields` is set through `extra`
        "request_id": "req-42",
        "decision": "forbidden",
        "reason": "forbidden",
        "introspector": "idp",
        "user_id": "user-1",
        "method": "POST",
        "path": "/admin",
        "latency_ms": 2.5,
        "protocol": "grpc",
        "policy": None,  # a denial: no policy allowed (an allow names the one that did)
    }


def test_decision_line_names_the_protocol(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="authz_service.decision"):
        log_decision(HttpRequest(), Decision(Outcome.ALLOW, Reason.ANONYMOUS), 0.001, logging.INFO, protocol="http")
    [record] = caplog.records
    assert getattr(record, "fields")["protocol"] == "http"  # noqa: B009


def test_decision_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="authz_service.decision"):
        log_decision(HttpRequest(), Decision(Outcome.ALLOW, Reason.ANONYMOUS), 0.001, None)
    assert caplog.records == []


def test_decision_log_respects_the_logger_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="authz_service.decision"):
        log_decision(HttpRequest(), Decision(Outcome.ALLOW, Reason.ANONYMOUS), 0.001, logging.INFO)
    assert caplog.records == []


def test_internal_error_logs_type_and_place_never_the_message(caplog: pytest.LogCaptureFixture) -> None:
    def parse(token: str) -> None:
        raise ValueError(f"cannot parse {token}")

    try:
        parse(JWT)
    except ValueError as err:
        with caplog.at_level(logging.ERROR, logger="authz_service"):
            log_internal_error(err)
    [record] = caplog.records
    text = rendered(record)
    assert JWT not in text
    assert "ValueError" in text
    assert "in parse" in text


def test_internal_error_stack_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    def down(n: int) -> None:
        if n == 0:
            raise RuntimeError("deep")
        down(n - 1)

    try:
        down(500)
    except RuntimeError as err:
        with caplog.at_level(logging.ERROR, logger="authz_service"):
            log_internal_error(err)
    [record] = caplog.records
    assert record.getMessage().count(" in down") <= 8


# --------------------------------------------------------------------------- metrics


# in_files: counted through prometheus-client's values (supervised workers) or in plain numbers.
BOTH_WAYS = pytest.mark.parametrize("in_files", [False, True], ids=["plain", "prometheus-client"])


@BOTH_WAYS
def test_checks_are_counted_by_decision_reason_and_protocol(in_files: bool) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=in_files)
    metrics.observe(Decision(Outcome.UNAUTHENTICATED, Reason.EXPIRED), 0.002)
    metrics.observe(Decision(Outcome.UNAUTHENTICATED, Reason.EXPIRED), 0.004)
    metrics.observe(Decision(Outcome.ALLOW, Reason.ALLOWED), 0.001)
    metrics.observe(Decision(Outcome.ALLOW, Reason.ALLOWED), 0.001, protocol="http")
    expired = {"decision": "unauthenticated", "reason": "expired", "protocol": "grpc"}
    assert registry.get_sample_value("authz_checks_total", expired) == 2
    allowed = {"decision": "allow", "reason": "allowed"}
    assert registry.get_sample_value("authz_checks_total", {**allowed, "protocol": "grpc"}) == 1
    assert registry.get_sample_value("authz_checks_total", {**allowed, "protocol": "http"}) == 1
    grpc = {"protocol": "grpc"}
    assert registry.get_sample_value("authz_check_duration_seconds_count", grpc) == 3
    assert registry.get_sample_value("authz_check_duration_seconds_bucket", {**grpc, "le": "0.002"}) == 2
    assert registry.get_sample_value("authz_check_duration_seconds_count", {"protocol": "http"}) == 1


@BOTH_WAYS
def test_cache_and_upstream_events_are_counted(in_files: bool) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=in_files)
    metrics.cache_event("verified", "hit")
    metrics.cache_event("verified", "hit")
    metrics.cache_event("ext", "miss")
    metrics.upstream_call("jwks", "timeout")
    assert registry.get_sample_value("authz_cache_events_total", {"cache": "verified", "event": "hit"}) == 2
    assert registry.get_sample_value("authz_cache_events_total", {"cache": "ext", "event": "miss"}) == 1
    assert registry.get_sample_value("authz_upstream_calls_total", {"endpoint": "jwks", "outcome": "timeout"}) == 1


def _exposition(metrics: Metrics) -> list[str]:
    # Without the _created samples: prometheus-client's own values carry their creation time.
    text = generate_latest(metrics.registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_plain_counts_expose_exactly_what_prometheus_client_would() -> None:
    plain, files = Metrics(CollectorRegistry(), in_files=False), Metrics(CollectorRegistry(), in_files=True)
    decisions = [Decision(outcome, reason) for outcome, reason in zip(Outcome, Reason, strict=False)]
    # On a bucket bound, between bounds, past the last bound, and zero.
    seconds = [0.0, 0.0005, 0.0007, 0.002, 0.0999, 5.0, 7.5, 1e-9]
    for n, (decision, latency) in enumerate(itertools.product(decisions, seconds)):
        for metrics in (plain, files):
            metrics.observe(decision, latency, protocol=("grpc", "http")[n % 2])
            metrics.cache_event(("verified", "opaque")[n % 2], ("hit", "miss", "error")[n % 3])
    assert _exposition(plain) == _exposition(files)
    assert plain.registry.get_sample_value("authz_check_duration_seconds_bucket", {"protocol": "grpc", "le": "+Inf"})


def test_plain_counts_cannot_be_registered_twice() -> None:
    registry = CollectorRegistry()
    Metrics(registry, in_files=False)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry, in_files=False)


def test_each_metrics_owns_its_registry() -> None:
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.upstream_call("jwks", "ok")
    labels = {"endpoint": "jwks", "outcome": "ok"}
    assert first.registry.get_sample_value("authz_upstream_calls_total", labels) == 1
    assert second.registry.get_sample_value("authz_upstream_calls_total", labels) is None


def test_api_metrics_count_writes_by_writer_type_and_action() -> None:
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    metrics.write("alice", "AccessPolicy", "create")
    metrics.write("alice", "AccessPolicy", "create")
    metrics.write("ci", "User", "delete")
    metrics.allow_everything.labels("alice").inc()
    labels = {"writer": "alice", "type": "AccessPolicy", "action": "create"}
    assert registry.get_sample_value("authz_api_writes_total", labels) == 2
    assert (
        registry.get_sample_value("authz_api_writes_total", {"writer": "ci", "type": "User", "action": "delete"}) == 1
    )
    assert registry.get_sample_value("authz_api_allow_everything_writes_total", {"writer": "alice"}) == 1
