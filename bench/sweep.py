"""The concurrency sweep behind the plots: checks/s and p50/p99 latency at 1, 4, 16 and 64
connections for eight curves, every point measured the same way.

| curve | what h2load talks to |
|---|---|
| no-op gRPC | bench/noop_server.py, h2c, the CheckRequest body |
| authz gRPC | the service (defaults + server.http_address), h2c, the same body |
| no-op HTTP | bench/noop_http_server.py, HTTP/1.1 (--h1), the /forward_auth request |
| no-op HTTP granian | bench/noop_http_server.py --engine granian (the service's HTTP stack, no check) |
| authz HTTP | the same service's /forward_auth (HTTP mode on granian, the default), the same request |
| Envoy -> ext_authz gRPC | Envoy (shipped envoy.yaml) -> the service over gRPC -> echo |
| Envoy -> ext_authz HTTP | Envoy (shipped envoy-http.yaml) -> the service's HTTP mode -> echo |
| Envoy jwt_authn | Envoy (bench/envoy-jwt-authn.yaml) -> echo, the token checked inside Envoy |

Every point: `h2load -c N -m 1 -t 1 -D <sweep_s> --log-file` (one request in flight per
connection, closed loop); checks/s is h2load's req/s over the run, p50/p99 come from the
per-request times in the log file (a C client, microsecond resolution). Each curve is verified
first (an allow with the identity; through Envoy also two 401s) and warmed up at 16 connections.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Final

from checkreq import CHECK_PATH, check_request, http_check_headers, http_check_path
from load import GRPC_HEADERS, h2load_run
from procs import HOST, Proc, free_port, start_echo, start_envoy, start_noop
from scenarios import ENVOY_HTTP_YAML, Bench, Profile, Row, http_answer, verify_check, verify_http_check

from authz_service.devstack.envoy import ENVOY_YAML, load_config, on_loopback

LEVELS: Final = (1, 4, 16, 64)
ENVOY_PATH: Final = "/api/Patient/pt-1"


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured point of one curve."""

    target: str
    label: str
    connections: int
    rate: float
    p50_ms: float
    p99_ms: float
    done: int


@dataclasses.dataclass(frozen=True)
class Curve:
    """What one curve loads: its URL, protocol, headers and body."""

    key: str
    label: str
    url: str
    h1: bool
    headers: list[str]
    body: Path | None = None


# The curves in the order of the plots' legends.
LABELS: Final = {
    "noop-grpc": "no-op gRPC (grpc.aio)",
    "authz-grpc": "authz-service gRPC",
    "noop-http": "no-op HTTP (aiohttp)",
    "noop-http-granian": "no-op HTTP (granian ASGI)",
    "authz-http": "authz-service HTTP /forward_auth",
    "envoy-grpc": "Envoy -> ext_authz gRPC",
    "envoy-http": "Envoy -> ext_authz HTTP",
    "envoy-jwt-authn": "Envoy jwt_authn (native)",
}


def time_bound(profile: Profile) -> int:
    """Seconds the whole sweep may take: every point, warm-ups, and the processes' starts."""
    per_curve = len(LEVELS) * (profile.sweep_s + 3) + profile.warmup_ms / 1000 + 5
    return int(len(LABELS) * per_curve + 90)


def _measure(bench: Bench, curve: Curve, points: list[Point], notes: list[str]) -> None:
    h2load_run(
        curve.url,
        connections=16,
        duration=f"{bench.p.warmup_ms}ms",
        h1=curve.h1,
        headers=curve.headers,
        body=curve.body,
    )
    for connections in LEVELS:
        try:
            result = h2load_run(
                curve.url,
                connections=connections,
                duration=bench.p.sweep_s,
                h1=curve.h1,
                headers=curve.headers,
                body=curve.body,
                log_file=bench.work / f"sweep-{curve.key}-c{connections}.tsv",
            )
        except RuntimeError as err:
            notes.append(f"{curve.key} at {connections} connections failed: {str(err).splitlines()[0]}")
            continue
        points.append(
            Point(curve.key, curve.label, connections, result.rate, result.p50_ms, result.p99_ms, result.done)
        )


def s_sweep(bench: Bench) -> Row:
    levels = ", ".join(map(str, LEVELS))
    row = Row(
        "sweep",
        f"concurrency sweep ({levels} connections): no-op and service over gRPC and HTTP, and through Envoy",
        floor="",
    )
    points: list[Point] = []
    bench.extra["sweep"] = points
    token = bench.token("es256")
    owned: list[Proc] = []
    try:
        noop = bench.noop or start_noop(bench.work)
        bench.noop = noop
        _, noop_http_port = bench.start_noop_http()
        _, noop_granian_port = bench.start_noop_granian()
        why = "server.http_address set: one service answers the gRPC and the HTTP curves, direct and through Envoy"
        authz = bench.start_service(row, bench.cfg_jwks(), why, http=True)
        owned.append(authz.proc)
        echo, echo_port = start_echo(bench.work, "echo-sweep")
        owned.append(echo)

        request = check_request(token)
        body = bench.body_file("sweep", request)
        verify_check(noop.port, request, (0, None))
        verify_check(authz.port, request, (0, "allow"))
        forward = http_check_headers(token, "forward_auth")
        noop_http_url = f"http://{HOST}:{noop_http_port}{http_check_path('forward_auth')}"
        noop_granian_url = f"http://{HOST}:{noop_granian_port}{http_check_path('forward_auth')}"
        for url in (noop_http_url, noop_granian_url):
            if http_answer(url, forward)[0] != 200:
                raise RuntimeError(f"the no-op HTTP server at {url} did not answer 200")
        authz_http_url = f"http://{HOST}:{authz.http_port}{http_check_path('forward_auth')}"
        verify_http_check(
            authz_http_url,
            forward,
            {"a bad signature": http_check_headers(bench.token("es256_bad_signature"), "forward_auth")},
        )
        direct = [
            Curve(
                "noop-grpc", LABELS["noop-grpc"], f"http://{HOST}:{noop.port}{CHECK_PATH}", False, [*GRPC_HEADERS], body
            ),
            Curve(
                "authz-grpc",
                LABELS["authz-grpc"],
                f"http://{HOST}:{authz.port}{CHECK_PATH}",
                False,
                [*GRPC_HEADERS],
                body,
            ),
            Curve("noop-http", LABELS["noop-http"], noop_http_url, True, forward),
            Curve("noop-http-granian", LABELS["noop-http-granian"], noop_granian_url, True, forward),
            Curve("authz-http", LABELS["authz-http"], authz_http_url, True, forward),
        ]
        for curve in direct:
            _measure(bench, curve, points, row.notes)

        assert authz.http_port is not None
        envoys: list[tuple[str, dict[str, Any], dict[str, int]]] = []
        for key in ("envoy-grpc", "envoy-http", "envoy-jwt-authn"):
            listener = free_port()
            if key == "envoy-grpc":
                config = on_loopback(
                    load_config(ENVOY_YAML),
                    listener=listener,
                    admin=free_port(),
                    clusters={"authz": [authz.port], "upstream": echo_port},
                )
                healthy = {"authz": 1}
            elif key == "envoy-http":
                config = on_loopback(
                    load_config(ENVOY_HTTP_YAML),
                    listener=listener,
                    admin=free_port(),
                    clusters={"authz_http": authz.http_port, "upstream": echo_port},
                )
                healthy = {"authz_http": 1}
            else:
                config, healthy = bench.jwt_authn_config(listener, echo_port), {}
            envoys.append((key, config, healthy))
        for key, config, healthy in envoys:
            envoy = start_envoy(f"sweep-{key}", config, bench.work, healthy)
            try:
                listener = int(config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"])
                url = f"http://{HOST}:{listener}{ENVOY_PATH}"
                bench.verify_envoy(url)
                _measure(
                    bench, Curve(key, LABELS[key], url, True, [f"authorization: Bearer {token}"]), points, row.notes
                )
            finally:
                envoy.stop()
    finally:
        for proc in reversed(owned):
            proc.stop()
    row.verified = (
        "each curve: allow with identity first (through Envoy also 401 without token and with a bad signature)"
    )
    row.notes.insert(
        0,
        f"{len(points)} points ({len(LABELS)} curves x {len(LEVELS)} levels), h2load -m1 -D {bench.p.sweep_s} s "
        "--log-file per point; the table and plots are below",
    )
    if not points:
        raise RuntimeError("no point of the sweep was measured: " + "; ".join(row.notes))
    return row
