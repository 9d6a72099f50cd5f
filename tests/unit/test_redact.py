"""redact: the one rule for what of a request may reach a log line."""

from __future__ import annotations

import pytest

from authz_service.redact import redact
from tests.unit.fakes import EcSigner

JWT = EcSigner("k1").sign({"iss": "https://idp", "sub": "user-1", "exp": 2_000_000_000})
OPAQUE = "tok_7f3a9c2e4b1d8f6a0c5e7b9d1f3a5c7e"


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
        "lone \udc80 surrogate",  # a header decoded with surrogateescape: hashed, never an exception
    ],
)
def test_suspicious_request_ids_become_a_hash(value: str) -> None:
    redacted = redact.identifier(value)
    assert redacted.startswith("sha256:")
    assert len(redacted) == len("sha256:") + 16
    assert value not in redacted
    assert redacted == redact.identifier(value)  # stable: log lines of one request still correlate


def test_path_loses_its_query() -> None:
    assert redact.path(f"/fhir/Patient?access_token={OPAQUE}&_count=10") == "/fhir/Patient"


def test_path_and_method_are_capped() -> None:
    assert redact.path("/" + "a" * 1000) == "/" + "a" * 255
    assert redact.method("UPDATEREDIRECTREF") == "UPDATEREDIRECTREF"
    assert redact.method("M" * 6000) == "M" * 32  # X-Forwarded-Method is whatever a client sends


def test_user_id_is_capped_not_hidden() -> None:
    assert redact.user_id("user-1") == "user-1"
    assert redact.user_id("u" * 500) == "u" * 128
    assert redact.user_id(None) is None
