"""Load generators, each bounded by a duration: h2load (gRPC Check over h2c, HTTP/1.1 with --h1,
open-loop with --rps), wrk (HTTP through Envoy) and bench/grpc_load.py (a distinct token on
every Check, which h2load cannot send)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from checkreq import CHECK_PATH
from procs import BENCH, HOST, PY, run_cmd

TOOLS: Final = {"h2load": "nghttp2-client", "wrk": "wrk"}  # tool -> Debian package


def ensure_tools() -> None:
    """h2load (nghttp2-client) and wrk: installed with apt-get when missing and we may."""
    wanted = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if not wanted:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: installing {' '.join(wanted)} with apt-get", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *wanted],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=600,
        )
    else:
        sys.exit(f"bench: please install the Debian packages: {' '.join(wanted)}")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What one bounded load run measured."""

    rate: float  # answers per second
    done: int  # answers received
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")


@dataclasses.dataclass(frozen=True)
class H2Result(LoadResult):
    """h2load's summary, and with --log-file every request's (start µs since epoch, status, µs)."""

    started: int = 0  # requests h2load began (open-loop: the offered load)
    failed: int = 0  # failed + errored + timed out
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)  # "2xx" -> count
    log: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # h2load's "finished in"

    def status_share(self, prefix: str) -> float:
        """Share of the logged answers whose HTTP status starts with prefix ("5", "503")."""
        if not self.log:
            return float("nan")
        return sum(1 for _, status, _ in self.log if str(status).startswith(prefix)) / len(self.log)


GRPC_HEADERS: Final = ("content-type: application/grpc", "te: trailers")
_SECONDS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def h2load_run(
    url: str,
    *,
    connections: int,
    duration: float | str,
    streams: int = 1,
    h1: bool = False,
    body: Path | None = None,
    headers: Sequence[str] = (),
    log_file: Path | None = None,
    rps: float | None = None,
    strict: bool = True,
) -> H2Result:
    """One bounded h2load run (`duration` seconds, or e.g. "500ms"): -c connections x -m streams.

    h1: HTTP/1.1 keep-alive (`--h1`) instead of h2c. rps: open-loop, that many requests per second
    per connection (h2load --rps). log_file: every request's latency, for p50/p99. strict: any
    failed request or any non-2xx answer raises (a load that measured errors is no measurement).
    """
    argv = ["h2load", "-c", str(connections), "-m", str(streams), "-t", "1", "-D", str(duration)]
    if h1:
        argv.append("--h1")
    if rps is not None:
        argv.append(f"--rps={max(rps, 0.1):.1f}")
    for header in headers:
        argv += ["-H", header]
    if body is not None:
        argv += ["-d", str(body)]
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    argv.append(url)
    bound = duration if isinstance(duration, (int, float)) else 30
    done = run_cmd(argv, timeout=bound + 30)
    out = done.stdout
    finished = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        out,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not finished or not counts:
        raise RuntimeError(f"h2load failed (exit {done.returncode}):\n{out[-1500:]}\n{done.stderr[-800:]}")
    answered = int(counts.group(3))
    failed = int(counts.group(5)) + int(counts.group(6)) + int(counts.group(7))
    statuses = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, codes.groups()), strict=True)) if codes else {}
    if strict and (failed or statuses.get("2xx", 0) != answered):
        raise RuntimeError(f"h2load saw failures or non-2xx answers:\n{out[-1500:]}")
    log: list[tuple[int, int, int]] = []
    if log_file is not None:
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                log.append((int(parts[0]), int(parts[1]), int(parts[2])))
    micros = [float(latency) for _, _, latency in log]
    return H2Result(
        rate=float(finished.group(3)),
        done=answered,
        p50_ms=percentile(micros, 0.50) / 1000,
        p99_ms=percentile(micros, 0.99) / 1000,
        started=int(counts.group(2)),
        failed=failed,
        statuses=statuses,
        log=log,
        seconds=float(finished.group(1)) * _SECONDS.get(finished.group(2), 1.0),
    )


def h2load(port: int, body: Path, connections: int, duration: float | str, log_file: Path | None = None) -> LoadResult:
    """h2load against Check over h2c, one stream per connection; percentiles need log_file."""
    return h2load_run(
        f"http://{HOST}:{port}{CHECK_PATH}",
        connections=connections,
        duration=duration,
        body=body,
        headers=GRPC_HEADERS,
        log_file=log_file,
    )


_WRK_UNITS: Final = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk(url: str, connections: int, duration: int, token: str) -> LoadResult:
    """wrk with a bearer token for `duration` seconds; any non-2xx answer or socket error fails it."""
    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration}s", "--latency", "--timeout", "5s"]
    argv += ["-H", f"Authorization: Bearer {token}", url]
    done = run_cmd(argv, timeout=duration + 30)
    out = done.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        raise RuntimeError(f"wrk failed (exit {done.returncode}):\n{out[-1500:]}\n{done.stderr[-800:]}")
    non2xx_match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors_match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = int(non2xx_match.group(1)) if non2xx_match else 0
    errors = sum(map(int, errors_match.groups())) if errors_match else 0
    if non2xx or errors:
        raise RuntimeError(f"wrk saw {non2xx} non-2xx answers, {errors} socket errors:\n{out}")
    quantiles = []
    for label in ("50%", "99%"):
        match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        quantiles.append(float(match.group(1)) * _WRK_UNITS[match.group(2)] if match else float("nan"))
    return LoadResult(float(rate.group(1)), int(total.group(1)), *quantiles)


@dataclasses.dataclass(frozen=True)
class GrpcLoadResult(LoadResult):
    """bench/grpc_load.py's answer: also how many were sent, allowed and failed."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0


def grpc_load(
    port: int,
    *,
    tokens: Path | None = None,
    token: str | None = None,
    skip: int = 0,
    count: int,
    concurrency: int,
    channels: int,
    duration: float,
) -> GrpcLoadResult:
    """bench/grpc_load.py: each token of `tokens` (from line `skip`) sent once, or `token` `count` times."""
    argv = [PY, str(BENCH / "grpc_load.py"), "--target", f"{HOST}:{port}", "--count", str(count)]
    argv += ["--skip", str(skip), "--concurrency", str(concurrency), "--channels", str(channels)]
    argv += ["--duration", str(duration)]
    if tokens is not None:
        argv += ["--tokens", str(tokens)]
    elif token is not None:
        argv += ["--token", token]
    done = run_cmd(argv, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"grpc_load failed:\n{done.stderr[-1500:]}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    answered = sum(int(n) for n in line["codes"].values())
    return GrpcLoadResult(
        rate=float(line["rate"]),
        done=answered,
        p50_ms=float(line["p50_ms"]),
        p99_ms=float(line["p99_ms"]),
        sent=int(line["sent"]),
        ok=int(line["ok"]),
        errors=int(line["errors"]),
        seconds=float(line["seconds"]),
    )
