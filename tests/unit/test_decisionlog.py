"""decisionlog: one line per decision that never carries a credential, through the DecisionLog
the process was given (a writer thread, or stdlib logging without one)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from authz_service.decisionlog import DecisionLog, DecisionWriter, log_internal_error, log_policy_timeout
from authz_service.errors import PolicyTimeout
from authz_service.logs import JsonFormatter
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from tests.unit.fakes import EcSigner

JWT = EcSigner("k1").sign({"iss": "https://idp", "sub": "user-1", "exp": 2_000_000_000})
OPAQUE = "tok_7f3a9c2e4b1d8f6a0c5e7b9d1f3a5c7e"
ALLOW = Decision(Outcome.ALLOW, Reason.ANONYMOUS)


def rendered(record: logging.LogRecord) -> str:
    """The line the service writes for a record (its JSON formatter: message and structured fields)."""
    return JsonFormatter().format(record)


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


CREDENTIAL_DECISIONS = pytest.mark.parametrize(
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


@CREDENTIAL_DECISIONS
def test_decision_line_never_carries_a_credential(caplog: pytest.LogCaptureFixture, decision: Decision) -> None:
    with caplog.at_level(logging.INFO, logger="authz_service.decision"):
        DecisionLog().log_decision(request_with_credentials(), decision, 0.0012, logging.INFO)
    [record] = caplog.records
    text = rendered(record)
    assert JWT not in text
    assert OPAQUE not in text
    assert "access_token" not in text


@CREDENTIAL_DECISIONS
def test_the_writer_line_never_carries_a_credential(decision: Decision) -> None:
    read, write = os.pipe()
    try:
        decisions = DecisionLog.to_fd(write, logging.INFO)
        decisions.log_decision(request_with_credentials(), decision, 0.0012, logging.INFO)
        decisions.stop()
        os.set_blocking(read, False)
        text = os.read(read, 65536).decode()
    finally:
        os.close(read)
        os.close(write)
    assert json.loads(text)["decision"] == decision.outcome.value  # the line was written
    assert JWT not in text
    assert OPAQUE not in text
    assert "access_token" not in text


def test_decision_line_fields(caplog: pytest.LogCaptureFixture) -> None:
    identity = Identity("user-1", {"sub": "user-1"}, "idp", "jwt")
    decision = Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, identity, introspector="idp")
    request = HttpRequest(method="POST", path="/admin?x=1", request_id="req-42")
    with caplog.at_level(logging.INFO, logger="authz_service.decision"):
        DecisionLog().log_decision(request, decision, 0.0025, logging.INFO)
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
        DecisionLog().log_decision(HttpRequest(), ALLOW, 0.001, logging.INFO, protocol="http")
    [record] = caplog.records
    assert getattr(record, "fields")["protocol"] == "http"  # noqa: B009


def test_decision_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    read, write = os.pipe()
    try:
        with_writer = DecisionLog(DecisionWriter(write, logging.DEBUG))  # not started: lines stay queued
        with caplog.at_level(logging.DEBUG, logger="authz_service.decision"):
            DecisionLog().log_decision(HttpRequest(), ALLOW, 0.001, None)
            with_writer.log_decision(HttpRequest(), ALLOW, 0.001, None)
        assert with_writer.writer is not None
        assert len(with_writer.writer._queue) == 0
    finally:
        os.close(read)
        os.close(write)
    assert caplog.records == []


def test_decision_log_respects_the_level(caplog: pytest.LogCaptureFixture) -> None:
    writer = DecisionWriter(1, logging.WARNING)  # not started: what it accepts stays queued
    with caplog.at_level(logging.WARNING, logger="authz_service.decision"):
        DecisionLog().log_decision(HttpRequest(), ALLOW, 0.001, logging.INFO)
        DecisionLog(writer).log_decision(HttpRequest(), ALLOW, 0.001, logging.INFO)
    assert caplog.records == []
    assert len(writer._queue) == 0
    DecisionLog(writer).log_decision(HttpRequest(), ALLOW, 0.001, logging.ERROR)
    assert len(writer._queue) == 1


def test_the_logged_path_is_the_one_the_policies_judged(caplog: pytest.LogCaptureFixture) -> None:
    writer = DecisionWriter(1, logging.INFO)  # not started
    judged = Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, path="/fhir/Patient")
    request = HttpRequest(method="GET", path="/fhir/./Patient?x=1")
    with caplog.at_level(logging.INFO, logger="authz_service.decision"):
        DecisionLog().log_decision(request, judged, 0.001, logging.INFO)
    DecisionLog(writer).log_decision(request, judged, 0.001, logging.INFO)
    assert getattr(caplog.records[0], "fields")["path"] == "/fhir/Patient"  # noqa: B009
    assert writer._queue[0][4] == "/fhir/Patient"


def test_each_decision_log_is_its_own() -> None:
    # No module state: two logs (two services in one test process) never share a writer or a count.
    first, second = DecisionWriter(1, logging.INFO, max_queue=1), DecisionWriter(1, logging.INFO, max_queue=1)
    for _ in range(3):
        DecisionLog(first).log_decision(HttpRequest(), ALLOW, 0.001, logging.INFO)
    assert (DecisionLog(first).dropped(), DecisionLog(second).dropped(), DecisionLog().dropped()) == (2, 0, 0)


def test_internal_error_logs_type_and_place_never_the_message(caplog: pytest.LogCaptureFixture) -> None:
    def parse(token: str) -> None:
        raise ValueError(f"cannot parse {token}")

    try:
        parse(JWT)
    except ValueError as err:
        with caplog.at_level(logging.ERROR, logger="authz_service"):
            DecisionLog().log_internal_error(err)
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


def test_policy_timeout_names_the_policy_and_rule_part(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="authz_service"):
        DecisionLog().log_policy_timeout(PolicyTimeout("slow-regex", "matcho.uri"))
        log_policy_timeout(PolicyTimeout("other", "matcho.params"))
    first, second = (getattr(r, "fields") for r in caplog.records)  # noqa: B009
    assert first == {"policy": "slow-regex", "rule": "matcho.uri"}
    assert second == {"policy": "other", "rule": "matcho.params"}
