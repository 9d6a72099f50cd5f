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
