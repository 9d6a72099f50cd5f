"""Processes of a benchmark run: start them, meter their CPU and memory, stop them by pid.

Children are started with authz_service.devstack.procs (logs in the run's work directory; they
die with us) and Envoy with authz_service.devstack.envoy, the launcher the demo and the e2e
tests use. Every child is registered in RUNNING until it is stopped, so stop_all() leaves
nothing behind on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import grpc
import yaml
from grpc_health.v1 import health_pb2

from authz_service.devstack.envoy import Envoy, StartError
from authz_service.devstack.procs import Child, spawn, terminate

ROOT: Final = Path(__file__).resolve().parents[1]
BENCH: Final = ROOT / "bench"
PY: Final = sys.executable
HOST: Final = "127.0.0.1"
START_TIMEOUT: Final = 20.0
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
AUTHORIZATION_SERVICE: Final = "envoy.service.auth.v3.Authorization"
HEALTH_CHECK: Final = "/grpc.health.v1.Health/Check"


class Skip(Exception):
    """A scenario that cannot run here; the message says why."""


def free_port() -> int:
    """A port free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_port_range(count: int) -> int:
    """A base port P with P..P+count-1 free on 127.0.0.1 a moment ago."""
    for _ in range(200):
        base = free_port()
        if base + count >= 65535:
            continue
        try:
            for port in range(base + 1, base + count):
                with socket.socket() as sock:
                    sock.bind((HOST, port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


# --------------------------------------------------------------------------- children


@dataclasses.dataclass(eq=False)
class Proc:
    """A child we started: when, where its stdout goes, and how it stops."""

    child: Child
    started: float  # time.perf_counter() just before the spawn
    stdout: Path
    stopper: Callable[[], Coroutine[Any, Any, str | None]] | None = None  # default: terminate(child)

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def pid(self) -> int:
        return self.child.pid

    def alive(self) -> bool:
        return self.child.alive()

    def tail(self, lines: int = 15) -> str:
        return self.child.tail(lines)

    def ready_line(self, timeout: float) -> dict[str, Any]:
        """The JSON line the child prints on stdout once it listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            with contextlib.suppress(OSError):
                first, newline, _ = self.stdout.read_text().partition("\n")
                if newline:
                    line: dict[str, Any] = json.loads(first)
                    return line
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> str | None:
        """SIGTERM (it stops its own workers), SIGKILL after timeout, then SIGKILL what is left of its tree."""
        tree = tree_pids(self.pid) if self.alive() else []
        note = asyncio.run(self.stopper() if self.stopper is not None else terminate(self.child, timeout))
        for pid in tree[1:]:  # workers it started, if any outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self in RUNNING:
            RUNNING.remove(self)
        return note


RUNNING: list[Proc] = []


def start(name: str, argv: list[str], workdir: Path) -> Proc:
    """Start a child with its stderr in NAME.log and its stdout in NAME.stdout."""
    stdout = workdir / f"{name}.stdout"
    started = time.perf_counter()
    child = spawn(
        name,
        argv,
        workdir / f"{name}.log",
        stdout_log=stdout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )
    proc = Proc(child, started, stdout)
    RUNNING.append(proc)
    return proc


def stop_all() -> None:
    """Stop every child still running, the last started first."""
    for proc in reversed(list(RUNNING)):
        with contextlib.suppress(Exception):
            proc.stop(5)


def run_cmd(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A bounded child whose output we want (h2load, wrk, the Python load generator, check-config)."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), stdin=subprocess.DEVNULL, check=False
    )


# --------------------------------------------------------------------------- CPU and memory


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
    """Sum of VmRSS over the pids."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class CpuMeter:
    """CPU seconds used by a process tree inside a `with` block, per pid and in all."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.before: dict[int, int] = {}
        self.t0 = 0.0
        self.wall = 0.0
        self.per_pid: dict[int, float] = {}
        self.seconds = 0.0

    def __enter__(self) -> CpuMeter:
        self.before = cpu_ticks(tree_pids(self.root))
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        after = cpu_ticks(tree_pids(self.root))
        self.wall = time.perf_counter() - self.t0
        self.per_pid = {pid: (value - self.before.get(pid, 0)) / CLK_TCK for pid, value in after.items()}
        self.seconds = sum(self.per_pid.values())

    @property
    def percent(self) -> float:
        """100 = one core busy over the block."""
        return 100 * self.seconds / self.wall if self.wall else 0.0


# --------------------------------------------------------------------------- servers


def health_serving(channel: grpc.Channel, timeout: float) -> bool:
    """grpc.health.v1 says SERVING for the Authorization service."""
    check = channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    reply: health_pb2.HealthCheckResponse = check(
        health_pb2.HealthCheckRequest(service=AUTHORIZATION_SERVICE), timeout=timeout
    )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(port: int, proc: Proc, timeout: float = START_TIMEOUT) -> float:
    """Seconds from spawning `proc` to its grpc.health.v1 answering SERVING for the Authorization service."""
    deadline = time.monotonic() + timeout
    # Reconnect every 20-50 ms while the port is not bound yet. grpc's default backoff (1 s, then
    # 1.6 s, ...) made a start that bound just after an attempt measure ~2.6 s instead of ~1.2 s.
    options = [
        ("grpc.initial_reconnect_backoff_ms", 20),
        ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 50),
    ]
    with grpc.insecure_channel(f"{HOST}:{port}", options=options) as channel:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
            with contextlib.suppress(grpc.RpcError):
                if health_serving(channel, 0.25):
                    return time.perf_counter() - proc.started
            time.sleep(0.005)
    raise RuntimeError(f"{proc.name} not SERVING after {timeout:g} s:\n{proc.tail()}")


@dataclasses.dataclass
class Server:
    """A gRPC Check server that answers SERVING: the service or the no-op."""

    proc: Proc
    port: int
    serving_s: float
    processes: int = 1
    admin_port: int | None = None
    http_port: int | None = None  # server.http_address (HTTP mode), when the scenario turned it on
    worker_ports: list[int] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the service's config as written


# What every service start sets, whatever the scenario: where it listens, and a quick stop.
HARNESS_SETTINGS: Final = {
    "server.grpc_address": "127.0.0.1:<free port>",
    "server.admin_address": "127.0.0.1:<free port>",
    "server.drain_delay": "0",
    "server.shutdown_grace": "1",
}
HARNESS_WHY: Final = (
    "loopback only; drain_delay and shutdown_grace act only when a scenario stops the service, "
    "so it stops at once instead of after 5 + 10 s"
)


def wait_http_ready(port: int, proc: Proc, timeout: float = START_TIMEOUT) -> None:
    """Until the HTTP-mode listener answers GET /readyz with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=1) as reply:
            if reply.status == 200:
                return
        time.sleep(0.01)
    raise RuntimeError(f"{proc.name}: HTTP /readyz not 200 after {timeout:g} s:\n{proc.tail()}")


def start_authz(name: str, config: dict[str, Any], workdir: Path, *, http: bool = False) -> Server:
    """Write the scenario's config, check it with `check-config`, start the service, wait for SERVING.

    Only the HARNESS_SETTINGS are added (and worker_base_port when workers > 1; and, with http,
    server.http_address on a free port, which the scenario must list as its reason to differ):
    every other setting is the scenario's or the service's default. With workers > 1 the workers
    also listen on worker_base_port + i, and SERVING means every worker's own port answers SERVING
    (a health check on the shared port reaches just one of them). With http, the HTTP listener's
    /readyz must answer 200 as well.
    """
    port, admin_port = free_port(), free_port()
    server = config.setdefault("server", {})
    http_port = free_port() if http else None
    if http_port is not None:
        server["http_address"] = f"{HOST}:{http_port}"
    server.update(
        {
            "grpc_address": f"{HOST}:{port}",
            "admin_address": f"{HOST}:{admin_port}",
            "drain_delay": 0,
            "shutdown_grace": 1,
        }
    )
    workers = int(server.get("workers", 1))
    if workers > 1:
        server.setdefault("worker_base_port", free_port_range(workers))
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    check = run_cmd([PY, "-m", "authz_service", "check-config", str(path)], timeout=60)
    if check.returncode != 0:
        problems = (check.stderr or check.stdout).strip()
        if workers > 1 and "worker" in problems:
            raise Skip("skipped: workers>1 not supported")
        raise RuntimeError(f"check-config rejected the {name} config:\n{problems}")
    proc = start(f"authz-{name}", [PY, "-m", "authz_service", "--config", str(path)], workdir)
    try:
        if workers == 1:
            serving = wait_serving(port, proc)
            if http_port is not None:
                wait_http_ready(http_port, proc)
            return Server(proc, port, serving, 1, admin_port, http_port, config=config)
        base = int(server["worker_base_port"])
        ports = [base + i for i in range(workers)]
        serving = max(wait_serving(worker_port, proc) for worker_port in ports)
        serving = max(serving, wait_serving(port, proc))
        if http_port is not None:
            wait_http_ready(http_port, proc)
        return Server(proc, port, serving, workers, admin_port, http_port, ports, config)
    except BaseException:
        proc.stop()
        raise


def start_noop(workdir: Path, name: str = "noop") -> Server:
    """bench/noop_server.py, the floor."""
    proc = start(name, [PY, str(BENCH / "noop_server.py"), "--port", "0"], workdir)
    try:
        port = int(proc.ready_line(START_TIMEOUT)["port"])
        return Server(proc, port, wait_serving(port, proc))
    except BaseException:
        proc.stop()
        raise


def start_noop_http(workdir: Path, name: str = "noop-http", engine: str = "aiohttp") -> tuple[Proc, int]:
    """bench/noop_http_server.py, the HTTP floor of `engine` (aiohttp, granian): the process and its port."""
    proc = start(name, [PY, str(BENCH / "noop_http_server.py"), "--port", "0", "--engine", engine], workdir)
    try:
        return proc, int(proc.ready_line(START_TIMEOUT)["port"])
    except BaseException:
        proc.stop()
        raise


def start_idp(workdir: Path, opaque: int) -> tuple[Proc, dict[str, Any]]:
    """bench/idp_server.py with `opaque` pooled opaque tokens: the process and its token material."""
    argv = [PY, str(BENCH / "idp_server.py"), "--out", str(workdir / "idp"), "--opaque", str(opaque), "--ttl", "7200"]
    proc = start("idp", argv, workdir)
    try:
        ready = proc.ready_line(120)
        material: dict[str, Any] = json.loads(Path(ready["material"]).read_text())
    except BaseException:
        proc.stop()
        raise
    return proc, material


def start_echo(workdir: Path, name: str = "echo") -> tuple[Proc, int]:
    """The dev stack's echo upstream (authz_service.devstack.echo): the process and its port."""
    proc = start(name, [PY, "-m", "authz_service.devstack.echo", "--port", "0"], workdir)
    try:
        return proc, int(proc.ready_line(START_TIMEOUT)["port"])
    except BaseException:
        proc.stop()
        raise


def start_envoy(name: str, config: Mapping[str, Any], workdir: Path, healthy: Mapping[str, int]) -> Proc:
    """Envoy (authz_service.devstack.envoy) on a config from on_loopback; ready once LIVE and `healthy` holds."""
    started = time.perf_counter()
    envoy = Envoy.start(config, workdir, name)
    proc = Proc(envoy.child, started, envoy.access_log, envoy.stop)
    RUNNING.append(proc)

    async def ready() -> None:
        async with aiohttp.ClientSession() as session:
            await envoy.wait_ready(session, healthy)

    try:
        asyncio.run(ready())
    except StartError as err:
        proc.stop()
        raise RuntimeError(f"{err}:\n{envoy.child.tail()}") from err
    except BaseException:
        proc.stop()
        raise
    return proc
