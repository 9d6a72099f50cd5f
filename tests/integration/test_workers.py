"""server.workers: N processes on one port, supervised; metrics aggregated; signals reach all."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import Spawn, exit_code, free_port, jwks_introspector
from tests.harness import FRESH_CONNECTION, Answer, AuthorizationClient, check_request

pytestmark = pytest.mark.slow  # a supervisor and its worker processes


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


async def _workers(pid: int, count: int, timeout: float = 20.0) -> set[int]:
    """The worker pids once `count` of them are up (multiprocessing may add a resource tracker)."""
    end = time.monotonic() + timeout
    while True:
        spawned = {c for c in _children(pid) if b"spawn_main" in _cmdline(c)}
        if len(spawned) == count:
            return spawned
        assert time.monotonic() < end, f"expected {count} workers, have {spawned}"
        await asyncio.sleep(0.1)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile
        return b""


async def _check(port: int, token: str, path: str = "/") -> Answer:
    """One Check on its own connection (on the shared port the kernel picks the worker)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FRESH_CONNECTION) as channel:
        return Answer.of(await AuthorizationClient(channel).Check(check_request(path, token=token), timeout=10))


async def _ready(port: int, timeout: float = 20.0) -> str:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return await response.text()
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < end, "supervisor never became ready"
            await asyncio.sleep(0.1)


async def test_workers_share_the_port_and_are_supervised(idp: DevIdentityProvider, spawn: Spawn) -> None:
    base, admin = free_port(), free_port()
    while base + 1 == admin or not _free(base + 1):
        base = free_port()
    spawned = await spawn(
        {"introspectors": [jwks_introspector(idp)]},
        server={"workers": 2, "worker_base_port": base, "admin_address": f"127.0.0.1:{admin}", "drain_delay": 0.5},
    )
    await _ready(admin)
    workers = await _workers(spawned.process.pid, 2)
    token = idp.mint({"sub": "w"})
    # Each worker answers on its own port too, so Envoy can balance per request across processes.
    for port in (spawned.port, base, base + 1):
        answer = await _check(port, token)
        assert answer.allowed
        assert answer.headers["x-user-id"] == "w"
    for _ in range(20):
        assert (await _check(spawned.port, token)).allowed

    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{admin}/metrics") as response:
        metrics = await response.text()
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("authz_checks_total{") and 'decision="allow"' in line
    )
    assert total == 23  # counted across both processes
    latencies = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('authz_check_duration_seconds_count{protocol="grpc"}')
    )
    assert latencies == 23  # workers count through prometheus-client's files, not in their own memory

    # A worker that dies is replaced; the service keeps answering meanwhile.
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    # A connection the kernel had already queued on the dead worker's socket is reset; a retry on a
    # new connection lands on the living one (gRPC clients and Envoy retry connection failures).
    # The retries get 3 s, a bound for a busy machine, not an expected wait.
    failures: list[grpc.StatusCode] = []
    allowed = False
    for _ in range(60):
        try:
            answer = await _check(spawned.port, token)
        except grpc.aio.AioRpcError as err:
            failures.append(err.code())
            await asyncio.sleep(0.05)
            continue
        allowed = answer.allowed
        break
    assert allowed, failures
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE}, failures
    replaced = await _workers(spawned.process.pid, 2)
    assert victim not in replaced
    assert len(replaced) == 2
    await _ready(admin)

    # SIGHUP reaches every worker: a new policy applies on both workers' own ports.
    config = yaml.safe_load(spawned.path.read_text())
    config["policies"] = [{"id": "nothing-but-public", "engine": "matcho", "matcho": {"uri": "#^/public"}}]
    config.pop("authentication_only", None)  # policies replace the test's authentication-only mode
    spawned.path.write_text(yaml.safe_dump(config))
    spawned.process.send_signal(signal.SIGHUP)
    end = time.monotonic() + 10
    while True:
        answers = [await _check(port, token, "/private") for port in (base, base + 1)]
        if all(a.http_status == 403 for a in answers):
            break
        assert time.monotonic() < end, [a.http_status for a in answers]
        await asyncio.sleep(0.1)

    # SIGTERM stops every worker and the supervisor exits 0.
    spawned.process.send_signal(signal.SIGTERM)
    assert await exit_code(spawned.process, 20) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in replaced)  # noqa: ASYNC240  # a stat of /proc


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of `name` in a /metrics text."""
    found = []
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            head, _, value = line.rpartition(" ")
            found.append((head[len(name) :], float(value)))
    return found


def _rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    return 0.0


async def test_metrics_of_a_supervisor_and_its_workers(idp: DevIdentityProvider, spawn: Spawn) -> None:
    admin = free_port()
    public = {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public"}}
    quiet = {"id": "quiet", "engine": "matcho", "matcho": {"uri": "#^/quiet"}}
    spawned = await spawn(
        {"introspectors": [jwks_introspector(idp)], "policies": [public, quiet]},
        server={"workers": 2, "admin_address": f"127.0.0.1:{admin}"},
    )
    await _ready(admin)
    workers = await _workers(spawned.process.pid, 2)
    token = idp.mint()
    for _ in range(6):
        assert (await _check(spawned.port, token, "/public/x")).allowed
    assert (await _check(spawned.port, token, "/private")).http_status == 403
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{admin}/metrics") as response:
        text = await response.text()
    # Per-policy allows, added up across the workers; a configured policy that never allowed shows 0.
    assert _samples(text, "authz_policy_allows_total") == [('{policy="public"}', 6.0), ('{policy="quiet"}', 0.0)]
    # One build line, one in-flight gauge (the workers' sum), whatever the number of workers.
    [(labels, one)] = _samples(text, "authz_build_info")
    assert one == 1
    assert 'version="' in labels
    assert [value for _, value in _samples(text, "authz_checks_in_flight")] == [0.0]
    assert _samples(text, "python_info")
    # process_* is the group's: the supervisor's and every worker's memory, read at the scrape.
    group = [spawned.process.pid, *workers]
    [(_, rss)] = _samples(text, "process_resident_memory_bytes")
    expected = await asyncio.to_thread(lambda: sum(_rss(pid) for pid in group))
    assert 0.8 * expected <= rss <= 1.2 * expected, (rss, expected)
    [(_, cpu)] = _samples(text, "process_cpu_seconds_total")
    assert cpu > 0
    assert len(_samples(text, "process_start_time_seconds")) == 1
    assert "_created" not in text  # the same rule as a single process
