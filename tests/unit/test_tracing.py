"""W3C traceparent parsing (the decision log's trace_id and span_id come from it)."""

from __future__ import annotations

import sys

import pytest

from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.tracing import Spans, TraceParent, parse_traceparent, trace_ids

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_names_the_trace_and_the_callers_span() -> None:
    assert parse_traceparent(VALID) == TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
    unsampled = VALID[:-2] + "00"
    assert parse_traceparent(unsampled) == TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", False)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        VALID.upper(),  # hex is lower case
        "ff" + VALID[2:],  # version ff is invalid
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # all-zero span id
        VALID + "-extra",  # version 00 has exactly four fields
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        VALID + "x" * 600,
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str | None) -> None:
    assert parse_traceparent(value) is None
    if value is not None:
        assert trace_ids(value) is None  # the decision log's shorter path agrees


@pytest.mark.parametrize(
    "value",
    [VALID, VALID[:-2] + "00", "01" + VALID[2:] + "-next", " " + VALID, VALID + " ", "00" + VALID[2:-2] + "ff"],
)
def test_the_decision_logs_short_path_reads_what_the_parser_reads(value: str) -> None:
    parsed = parse_traceparent(value)
    assert parsed is not None
    assert trace_ids(value) == (parsed.trace_id, parsed.span_id)


def test_a_future_version_may_append_fields() -> None:
    assert parse_traceparent("01" + VALID[2:] + "-what-comes-next") is not None


async def test_spans_off_record_nothing() -> None:
    spans = Spans.off()
    assert not spans.enabled
    allow = Decision(Outcome.ALLOW, Reason.ALLOWED)

    async def decide(request: HttpRequest) -> Decision:
        return allow

    request = HttpRequest(headers={"traceparent": VALID})
    assert await spans.check(decide, request, "grpc", "req-1") is allow
    with spans.call("introspection", "POST", "https://idp.example/introspect") as span:
        assert span is None
    spans.outcome(span, "timeout")
    spans.shutdown()


def test_tracing_config_is_validated() -> None:
    from authz_service.errors import ConfigError
    from authz_service.registries import validate_config

    config = validate_config({"tracing": {"otlp_endpoint": "http://127.0.0.1:4317"}}, None)
    assert (config.tracing.otlp_endpoint, config.tracing.service_name) == ("http://127.0.0.1:4317", "authz-service")
    assert config.summary().endswith(", spans to http://127.0.0.1:4317")  # check-config and the start-up line
    with_userinfo = validate_config({"tracing": {"otlp_endpoint": "https://u:secret@otel.example:4317/x?k=v"}}, None)
    assert with_userinfo.summary().endswith(", spans to https://otel.example:4317")
    assert "spans" not in validate_config({}, None).summary()
    assert validate_config({}, None).tracing.otlp_endpoint is None
    with pytest.raises(ConfigError) as caught:
        validate_config({"tracing": {"otlp_endpoint": "collector:4317", "service_name": "a b", "x": 1}}, None)
    assert [str(p) for p in caught.value.problems] == [
        "tracing: otlp_endpoint must be an http:// or https:// URL",
        "tracing: service_name must be 1 to 64 letters, digits or '._-'",
        "tracing: x is not a known field",
    ]
    assert validate_config({"tracing": {"sample_ratio": 0}}, None).tracing.sample_ratio == 0.0
    assert validate_config({}, None).tracing.sample_ratio == 1.0
    with pytest.raises(ConfigError) as caught:
        validate_config({"tracing": {"sample_ratio": 1.5}}, None)
    assert [str(p) for p in caught.value.problems] == ["tracing: sample_ratio must be between 0 and 1, got 1.5"]


def test_an_endpoint_without_the_otel_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from authz_service.errors import ConfigError
    from authz_service.registries import validate_config

    # As if the extra were not installed: importing any opentelemetry module fails.
    for name in [name for name in sys.modules if name == "opentelemetry" or name.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    assert validate_config({}, None).tracing.otlp_endpoint is None  # off: nothing to install
    with pytest.raises(ConfigError) as caught:
        validate_config({"tracing": {"otlp_endpoint": "http://127.0.0.1:4317"}}, None)
    assert [str(p) for p in caught.value.problems] == [
        "tracing: otlp_endpoint needs OpenTelemetry, which is not installed: "
        "pip install 'authz-service[otel]' (the otel extra)"
    ]
