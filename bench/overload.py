"""The 5x overload scenario: how the service sheds load it cannot serve, and how fast it recovers.

1. Capacity: the service at its defaults (gRPC, ES256 via JWKS, one token: the cached path) under
   `h2load -c16 -m1` (closed loop), as in es256-jwks.
2. Overload, open loop: two h2load runs at once for `overload_s` seconds, together offering
   5 x capacity (`--rps` per connection): 80% with the valid token, 20% with a forged one (the
   IdP's kid, another key's signature), each request carrying `grpc-timeout` equal to the shipped
   envoy.yaml ext_authz timeout, as Envoy sends it. h2load keeps at most c x m streams open, so
   c x m (20,480) is set far above everything the service may queue (max_concurrent_checks, and
   grpc's own pending-call queue): the service's bounds, not the client's, decide what waits.
3. A probe (bench/overload_probe.py) sends 200 Checks/s, open loop, before, during and after the
   load, 20% of them with invalid tokens (forged, expired), and classifies every answer: allowed,
   refused, shed (RESOURCE_EXHAUSTED, or the service's deadline_exceeded 503) or timed out.

Reported: the share of answers that were shed and how fast, the latency of the checks that were
admitted and allowed (the probe's), the checks/s actually computed under overload against the
capacity, that no invalid token was allowed (every probe answer, and every decision line the
service logged for a bulk request with the forged token), and the time to recover: from the end
of the load to the first probe answered OK within normal latency (max(5 ms, 3 x the probe's p99
before the load)).
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from checkreq import CHECK_PATH, check_request
from load import GRPC_HEADERS, H2Result, h2load, h2load_run, percentile
from procs import BENCH, HOST, PY, CpuMeter, Server, rss_bytes, start, tree_pids
from scenarios import Bench, Row, verify_check

from authz_service.devstack.envoy import ENVOY_YAML, load_config

FACTOR: Final = 5
INVALID_SHARE: Final = 0.2
PROBE_RATE: Final = 200
BULK_VALID_ID: Final = "bench-overload-bulk-valid"
BULK_INVALID_ID: Final = "bench-overload-bulk-invalid"
PROBE_INVALID_ID: Final = "bench-overload-probe-invalid"
STREAMS: Final = 256  # per connection: h2load never holds back what the service would queue
VALID_CONNECTIONS: Final = 64
INVALID_CONNECTIONS: Final = 16
NORMAL_FLOOR_MS: Final = 5.0
RECOVERY_GOAL_S: Final = 5.0

Record = tuple[float, str, str, float]  # sent (monotonic), kind, outcome, latency ms


def envoy_check_timeout() -> float:
    """The ext_authz grpc_service timeout of the shipped envoy.yaml, in seconds (Envoy sends it as grpc-timeout)."""

    def walk(node: Any) -> Iterable[Any]:
        if isinstance(node, dict):
            yield node
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    for node in walk(load_config(ENVOY_YAML)):
        service = node.get("grpc_service")
        if isinstance(service, dict) and "timeout" in service:
            return float(str(service["timeout"]).rstrip("s"))
    return 0.2  # Envoy's own default


_LABELS = re.compile(r'(\w+)="([^"]*)"')


def metrics(server: Server) -> tuple[Counter[tuple[str, str]], float]:
    """gRPC checks by (decision, reason), and decision log lines dropped, from the admin /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{server.admin_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    checks: Counter[tuple[str, str]] = Counter()
    dropped = 0.0
    for line in text.splitlines():
        if line.startswith("authz_checks_total{"):
            labels = dict(_LABELS.findall(line))
            if labels.get("protocol") == "grpc":
                checks[(labels["decision"], labels["reason"])] += round(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("authz_decision_log_dropped_total "):
            dropped = float(line.rsplit(" ", 1)[1])
    return checks, dropped


def logged_decisions(log: Path, request_ids: set[str]) -> Counter[tuple[str, str]]:
    """(request_id, decision) of every decision line the service wrote for these request ids."""
    found: Counter[tuple[str, str]] = Counter()
    with log.open(errors="replace") as lines:
        for line in lines:
            if '"decision"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "decision" and entry.get("request_id") in request_ids:
                found[(str(entry["request_id"]), str(entry["decision"]))] += 1
    return found


# How a Check is refused without being computed: RESOURCE_EXHAUSTED from grpc.aio's limit
# (server.max_concurrent_checks); CANCELLED from grpc core when its queue of calls the server has
# not yet taken up is full (grpc.server.max_pending_requests: the call is dropped with RST_STREAM);
# the service's own deadline_exceeded answer for a call whose deadline passed while it waited.
SHED: Final = ("rpc:RESOURCE_EXHAUSTED", "rpc:CANCELLED")


def is_shed(outcome: str) -> bool:
    """A refusal to do the work (see SHED), as opposed to a decision or a client-side timeout."""
    return outcome in SHED or outcome.endswith(":deadline_exceeded")


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    return f"p50 {percentile(values, 0.5):.1f} / p99 {percentile(values, 0.99):.1f} ms"


def s_overload(bench: Bench, name: str, limit: int | None = None) -> Row:
    """The scenario; `limit` sets server.max_concurrent_checks (None: the default)."""
    what = f"{FACTOR}x capacity, open loop (gRPC, ES256 via JWKS, one valid token + {INVALID_SHARE:.0%} forged)"
    row = Row(name, what, floor="")
    config = bench.cfg_jwks()
    why = None
    if limit is not None:
        config["server"] = {"max_concurrent_checks": limit}
        why = f"max_concurrent_checks {limit} (default 2048), to compare a tighter bound on queued checks"
    server = bench.start_service(row, config, why)
    try:
        return _overload(bench, row, server)
    finally:
        server.proc.stop()
        bench.extra.setdefault("overload", {})[name] = bench.extra.pop("_overload_current", {})


def _overload(bench: Bench, row: Row, server: Server) -> Row:
    p = bench.p
    timeout = envoy_check_timeout()
    valid, forged, expired = bench.token("es256"), bench.token("es256_bad_signature"), bench.token("es256_expired")
    valid_request = check_request(valid, stream_id=BULK_VALID_ID)
    forged_request = check_request(forged, stream_id=BULK_INVALID_ID)
    verify_check(server.port, valid_request, (0, "allow"))
    verify_check(server.port, forged_request, (16, "bad_signature"))
    verify_check(server.port, check_request(expired, stream_id=PROBE_INVALID_ID), (16, "expired"))
    row.verified = "allow (x-user-id set); forged 16 bad_signature; expired 16 expired"
    valid_body = bench.body_file(f"{row.scenario}-valid", valid_request)
    forged_body = bench.body_file(f"{row.scenario}-forged", forged_request)

    # 1. capacity, closed loop
    h2load(server.port, valid_body, 16, f"{p.warmup_ms}ms")
    capacity = h2load(server.port, valid_body, 16, p.throughput_s).rate
    row.rate = capacity
    offered = FACTOR * capacity

    # 2. the probe, then the overload
    seconds = p.overload_baseline_s + p.overload_s + p.overload_recover_s
    out = bench.work / f"{row.scenario}-probe.json"
    probe_argv = [PY, str(BENCH / "overload_probe.py"), "--target", f"{HOST}:{server.port}"]
    probe_argv += ["--valid", valid, "--invalid", f"{forged},{expired}", "--invalid-share", str(INVALID_SHARE)]
    probe_argv += ["--rate", str(PROBE_RATE), "--seconds", str(seconds), "--timeout", str(timeout), "--out", str(out)]
    probe = start(f"probe-{row.scenario}", probe_argv, bench.work)
    try:
        t0 = float(probe.ready_line(30)["t0"])
        time.sleep(max(0.0, t0 + p.overload_baseline_s - time.monotonic()))
        before, _ = metrics(server)
        headers = [*GRPC_HEADERS, f"grpc-timeout: {round(timeout * 1000)}m"]
        url = f"http://{HOST}:{server.port}{CHECK_PATH}"
        runs = {
            "valid": (valid_body, VALID_CONNECTIONS, (1 - INVALID_SHARE) * offered),
            "forged": (forged_body, INVALID_CONNECTIONS, INVALID_SHARE * offered),
        }
        load_start = time.monotonic()
        with CpuMeter(server.proc.pid) as cpu, concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {
                kind: pool.submit(
                    h2load_run,
                    url,
                    connections=connections,
                    streams=STREAMS,
                    duration=p.overload_s,
                    body=body,
                    headers=headers,
                    rps=rate / connections,
                    log_file=bench.work / f"{row.scenario}-{kind}.tsv",
                    strict=False,
                )
                for kind, (body, connections, rate) in runs.items()
            }
            bulk = {kind: future.result() for kind, future in futures.items()}
        load_end = load_start + max(result.seconds for result in bulk.values())
        probe.child.process.wait(timeout=seconds + 60)
        after, dropped = metrics(server)
    finally:
        if probe.alive():
            probe.stop()
    row.cpu_pct = cpu.percent
    row.rss_mb = rss_bytes(tree_pids(server.proc.pid)) / 2**20
    records: list[Record] = [
        (float(sent), str(kind), str(outcome), float(ms))
        for sent, kind, outcome, ms in json.loads(out.read_text())["records"]
    ]
    logged = logged_decisions(server.proc.child.log, {BULK_INVALID_ID, PROBE_INVALID_ID})
    return _analyse(bench, row, capacity, bulk, records, (load_start, load_end), before, after, dropped, logged)


def _analyse(
    bench: Bench,
    row: Row,
    capacity: float,
    bulk: dict[str, H2Result],
    records: list[Record],
    window: tuple[float, float],
    before: Counter[tuple[str, str]],
    after: Counter[tuple[str, str]],
    dropped: float,
    logged: Counter[tuple[str, str]],
) -> Row:
    p = bench.p
    load_start, load_end = window
    baseline = [r for r in records if r[0] < load_start]
    during = [r for r in records if load_start <= r[0] < load_end]
    later = sorted((r for r in records if r[0] >= load_end), key=lambda r: r[0])
    base_ms = [r[3] for r in baseline if r[1] == "valid" and r[2] == "allow"]
    normal_ms = max(NORMAL_FLOOR_MS, 3 * percentile(base_ms, 0.99)) if base_ms else NORMAL_FLOOR_MS

    outcomes = Counter(r[2] for r in during)
    shed = [r for r in during if is_shed(r[2])]
    admitted_ok = [r[3] for r in during if r[1] == "valid" and r[2] == "allow"]
    timed_out = sum(1 for r in during if r[2] == "rpc:DEADLINE_EXCEEDED")
    invalid = [r for r in records if r[1] == "invalid"]
    invalid_allowed = [r for r in invalid if r[2] == "allow" or r[2].startswith("ok")]

    # Recovery: the first valid probe sent after the load that was allowed within normal latency.
    recovery_s: float | None = None
    steady = 0.0
    for index, record in enumerate(later):
        if record[1] == "valid" and record[2] == "allow" and record[3] <= normal_ms:
            recovery_s = record[0] + record[3] / 1000 - load_end
            rest = [r for r in later[index:] if r[1] == "valid"]
            steady = sum(1 for r in rest if r[2] == "allow" and r[3] <= normal_ms) / max(1, len(rest))
            break

    # The bulk, from h2load's counts and the service's own metrics over the load (the probe's part removed).
    delta = after - before
    window_probe = [r for r in records if r[0] >= load_start]
    probe_computed = sum(1 for r in window_probe if r[2] == "allow" or (r[2].startswith("deny") and not is_shed(r[2])))
    probe_skipped = sum(1 for r in window_probe if r[2].endswith(":deadline_exceeded"))
    skipped = sum(n for (_, reason), n in delta.items() if reason == "deadline_exceeded") - probe_skipped
    computed = sum(n for (_, reason), n in delta.items() if reason != "deadline_exceeded") - probe_computed
    allowed = delta.get(("allow", "allowed"), 0) - sum(1 for r in window_probe if r[2] == "allow")
    answered = sum(result.done for result in bulk.values())
    started = sum(result.started for result in bulk.values())
    by_grpc = max(0.0, answered - computed - skipped)
    latencies = sorted(lat / 1000 for result in bulk.values() for _, _, lat in result.log)
    fast = sum(1 for lat in latencies if lat <= 10) / max(1, len(latencies))
    timeout_ms = 1000 * envoy_check_timeout()
    held = sum(1 for lat in latencies if lat >= timeout_ms - 100) / max(1, len(latencies))
    forged_logged = sum(n for (rid, _), n in logged.items() if rid == BULK_INVALID_ID)
    invalid_logged_allowed = sum(n for (_, decision), n in logged.items() if decision == "allow")

    row.p50_ms = percentile(admitted_ok, 0.5) if admitted_ok else None
    row.p99_ms = percentile(admitted_ok, 0.99) if admitted_ok else None
    row.cpu_us = None
    summary: dict[str, Any] = {
        "capacity": capacity,
        "offered": started / p.overload_s,
        "answered": answered / p.overload_s,
        "computed_rate": computed / p.overload_s,
        "allowed_rate": allowed / p.overload_s,
        "bulk_shed_share": (by_grpc + skipped) / max(1, answered),
        "bulk_shed_grpc": by_grpc,
        "bulk_skipped": skipped,
        "bulk_fast_share": fast,
        "bulk_held_share": held,
        "probe_during": len(during),
        "probe_shed_share": len(shed) / max(1, len(during)),
        "probe_shed_ms": _ms([r[3] for r in shed]),
        "probe_timed_out": timed_out,
        "probe_outcomes": dict(outcomes.most_common()),
        "admitted_p50": row.p50_ms,
        "admitted_p99": row.p99_ms,
        "admitted_n": len(admitted_ok),
        "baseline_p99": percentile(base_ms, 0.99) if base_ms else None,
        "normal_ms": normal_ms,
        "recovery_s": recovery_s,
        "steady_share": steady,
        "invalid_probe": len(invalid),
        "invalid_probe_allowed": len(invalid_allowed),
        "forged_logged": forged_logged,
        "invalid_logged_allowed": invalid_logged_allowed,
        "log_dropped": dropped,
        "limit": row.deviations.get("server.max_concurrent_checks", "2048 (default)")
        if row.deviations
        else "2048 (default)",
        "overload_s": p.overload_s,
    }
    bench.extra["_overload_current"] = summary
    row.notes.append(
        f"checks/s = capacity (closed loop, 16 conn); offered {summary['offered']:,.0f}/s for {p.overload_s} s, "
        f"answered {summary['answered']:,.0f}/s; computed {summary['computed_rate']:,.0f}/s "
        f"({summary['computed_rate'] / max(1.0, capacity):.2f} x capacity)"
    )
    row.notes.append(
        f"shed: {summary['bulk_shed_share']:.0%} of the bulk's answers, {summary['probe_shed_share']:.0%} of the "
        f"probe's ({summary['probe_shed_ms']}); {timed_out} probe checks timed out at {timeout_ms / 1000:g} s"
    )
    row.notes.append(
        f"p50/p99 = admitted and allowed probe checks during the load ({len(admitted_ok)}; "
        f"before the load p99 {summary['baseline_p99'] or float('nan'):.1f} ms)"
    )
    row.notes.append(
        f"invalid tokens: {len(invalid)} probe checks, {len(invalid_allowed)} allowed; {forged_logged:,} bulk checks "
        f"with the forged token decided, {invalid_logged_allowed} allowed; decision lines dropped: {dropped:.0f}"
    )
    recovered = "not within the window" if recovery_s is None else f"{recovery_s:.2f} s"
    row.notes.append(
        f"recovery (load end -> first probe allowed within {normal_ms:.1f} ms): {recovered}; "
        f"{steady:.0%} of the valid probes after it within that"
    )
    if invalid_allowed or invalid_logged_allowed:
        raise RuntimeError(
            f"an invalid token was ALLOWED under overload: {len(invalid_allowed)} probe checks, "
            f"{invalid_logged_allowed} logged decisions"
        )
    return row


# HTTP mode at 5x: h2load --h1 holds one request per connection, so the open loop needs many
# connections: more than the bound below, so that the bound, not the client, decides what waits.
HTTP_LIMIT: Final = 256
HTTP_VALID_CONNECTIONS: Final = 480
HTTP_INVALID_CONNECTIONS: Final = 120


def s_overload_http(bench: Bench, name: str) -> Row:
    """HTTP mode (granian, /forward_auth) at 5x capacity, open loop, 20% forged tokens: how much is
    shed (503), what the valid share still gets, and that no forged token is ever allowed."""
    what = (
        f"HTTP mode {FACTOR}x capacity, open loop (/forward_auth on granian, ES256 via JWKS, "
        f"one valid token + {INVALID_SHARE:.0%} forged)"
    )
    row = Row(name, what, floor="")
    config = bench.cfg_jwks()
    config["server"] = {"max_concurrent_checks": HTTP_LIMIT}
    why = (
        "server.http_address set: HTTP mode is what this scenario measures; max_concurrent_checks "
        f"{HTTP_LIMIT} (default 2048), below the {HTTP_VALID_CONNECTIONS + HTTP_INVALID_CONNECTIONS} "
        "connections an HTTP/1.1 open loop needs"
    )
    server = bench.start_service(row, config, why, http=True)
    try:
        return _overload_http(bench, row, server)
    finally:
        server.proc.stop()


def _overload_http(bench: Bench, row: Row, server: Server) -> Row:
    from checkreq import http_check_headers, http_check_path
    from scenarios import verify_http_check

    p = bench.p
    url = f"http://{HOST}:{server.http_port}{http_check_path('forward_auth')}"
    valid = http_check_headers(bench.token("es256"), "forward_auth")
    forged = http_check_headers(bench.token("es256_bad_signature"), "forward_auth")
    row.verified = verify_http_check(url, valid, {"a forged signature": forged})
    h2load_run(url, connections=16, duration=f"{p.warmup_ms}ms", h1=True, headers=valid)
    capacity = h2load_run(url, connections=16, duration=p.throughput_s, h1=True, headers=valid).rate
    row.rate = capacity
    offered = FACTOR * capacity
    shares = {
        "valid": (valid, HTTP_VALID_CONNECTIONS, (1 - INVALID_SHARE) * offered),
        "forged": (forged, HTTP_INVALID_CONNECTIONS, INVALID_SHARE * offered),
    }
    with CpuMeter(server.proc.pid) as cpu, concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {
            kind: pool.submit(
                h2load_run,
                url,
                connections=connections,
                duration=p.overload_s,
                h1=True,
                headers=headers,
                rps=rate / connections,
                strict=False,
            )
            for kind, (headers, connections, rate) in shares.items()
        }
        results = {kind: run.result() for kind, run in runs.items()}
    row.cpu_pct = cpu.percent
    row.rss_mb = rss_bytes(tree_pids(server.proc.pid)) / 2**20
    forged_allowed = results["forged"].statuses.get("2xx", 0)
    for kind, result in results.items():
        answered = sum(result.statuses.values())
        shed = result.statuses.get("5xx", 0)
        row.notes.append(
            f"{kind}: {result.started:,} offered, {answered:,} answered ({answered / p.overload_s:,.0f}/s; "
            f"2xx {result.statuses.get('2xx', 0):,}, 4xx {result.statuses.get('4xx', 0):,}, 5xx (shed) {shed:,}), "
            f"{max(0, result.started - answered):,} unanswered when the load stopped"
        )
    row.notes.append(f"forged tokens allowed: {forged_allowed} (must be 0)")
    after = h2load_run(url, connections=16, duration=2, h1=True, headers=valid, strict=False)
    row.notes.append(
        f"after the load: {after.rate:,.0f} checks/s closed loop, {after.statuses.get('2xx', 0):,} of "
        f"{after.done:,} answered 200"
    )
    bench.extra["overload_http_forged_allowed"] = forged_allowed
    if forged_allowed:
        row.status = f"FAILED: {forged_allowed} forged tokens allowed under overload"
    return row
