"""The Redis store on a real redis-server: atomic writes from many clients, announcements, two
service processes converging, and Redis restarting in the middle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client import CollectorRegistry

from authz_service.config.model import Config
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.server.sync import ConfigSync, StoreMetrics
from authz_service.store.base import Change, Snapshot
from authz_service.store.redis import RedisStore
from authz_service.store.resources import read_config_file
from tests.api_harness import API_TOKEN, config_with_api, start_api_service
from tests.conftest import Spawn, Spawned, free_port, jwks_introspector
from tests.harness import Answer, AuthorizationClient, check_request


def policy(ident: str, uri: str = "#^/public") -> dict[str, Any]:
    return {"resourceType": "AccessPolicy", "id": ident, "engine": "matcho", "matcho": {"uri": uri}}


def put(*resources: dict[str, Any]) -> Callable[[Snapshot], list[Change]]:
    return lambda _: [Change((r["resourceType"], r["id"]), r) for r in resources]


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Callable[[], Awaitable[RedisStore]]]:
    """Open RedisStores on one fresh prefix of the session's Redis; closed after the test."""
    prefix = f"test:{secrets.token_hex(6)}"
    opened: list[RedisStore] = []

    async def open_one() -> RedisStore:
        one = RedisStore(redis_url, prefix)
        await one.open()
        opened.append(one)
        return one

    yield open_one
    for one in opened:
        await one.close()


async def test_writes_are_versioned_and_read_back(store: Callable[[], Awaitable[RedisStore]]) -> None:
    one = await store()
    empty = await one.load()
    assert (empty.version, empty.resources) == ("0", {})
    first = await one.update(put(policy("p1"), {"resourceType": "User", "id": "u", "name": "Ann"}))
    assert (first.version, first.generation) == ("1", 1)
    assert await one.version() == "1"
    assert (await one.load()).resources == first.resources
    assert (await one.update(put(policy("p1")))).version == "1"  # unchanged: nothing written
    gone = await one.update(lambda _: [Change(("User", "u"), None)])
    assert (gone.version, set(gone.resources)) == ("2", {("AccessPolicy", "p1")})

    def refuse(_: Snapshot) -> list[Change]:
        raise ValueError("invalid")

    with pytest.raises(ValueError, match="invalid"):
        await one.update(refuse)
    assert await one.version() == "2"


async def test_concurrent_writers_on_two_connections_lose_nothing(store: Callable[[], Awaitable[RedisStore]]) -> None:
    first, second = await store(), await store()
    writes = [s.update(put(policy(f"p{i}-{n}"))) for i in range(20) for n, s in enumerate((first, second))]
    await asyncio.gather(*writes)
    final = await first.load()
    assert len(final.resources) == 40
    assert final.version == "40"  # every write was one MULTI/EXEC with its INCR


async def test_a_write_is_announced_to_other_clients_at_once(store: Callable[[], Awaitable[RedisStore]]) -> None:
    writer, reader = await store(), await store()
    await reader.wait_for_change(0.5)  # the subscription announces itself once
    started = time.monotonic()
    waiting = asyncio.ensure_future(reader.wait_for_change(10))
    await asyncio.sleep(0.1)
    await writer.update(put(policy("p")))
    await waiting
    assert time.monotonic() - started < 1.0
    assert await reader.version() == "1"


# --------------------------------------------------------------------------- service processes


class RedisServer:
    """Our own redis-server (append-only file, fsync always), which a test may stop and restart."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; run the suite through ./dev test")
        self.process = subprocess.Popen(
            [
                *(binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "yes"),
                *("--appendfsync", "always", "--dir", str(self.directory), "--loglevel", "warning"),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with contextlib.closing(socket.create_connection(("127.0.0.1", self.port), 0.2)):
                    return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                assert self.process.poll() is None, "redis-server exited"
                time.sleep(0.05)

    def kill(self, *, wipe: bool = False) -> None:
        """SIGKILL; with `wipe`, its data goes too (the next start is an empty Redis)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        if wipe:
            for leftover in [*self.directory.glob("appendonly*"), *self.directory.glob("dump.rdb")]:
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


async def check(port: int, path: str, token: str) -> Answer:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return Answer.of(await AuthorizationClient(channel).Check(check_request(path, token=token), timeout=10))


async def api(
    session: aiohttp.ClientSession, admin: int, method: str, path: str, body: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "text/yaml"}
    async with session.request(method, f"http://127.0.0.1:{admin}{path}", data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def within(seconds: float, probe: Callable[[], Awaitable[bool]]) -> float:
    started = time.monotonic()
    while not await probe():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def two_services(spawn: Spawn, idp: DevIdentityProvider, url: str) -> list[tuple[Spawned, int]]:
    started = []
    for _ in range(2):
        admin = free_port()
        config = {
            "introspectors": [jwks_introspector(idp)],
            "api": {"token": API_TOKEN, "store": {"backend": "redis", "url": url}},
            "authentication_only": False,  # no policies in the file: nothing is allowed until the API adds some
        }
        started.append((await spawn(config, server={"admin_address": f"127.0.0.1:{admin}"}), admin))
    return started


@pytest.mark.slow  # two service processes
async def test_two_service_processes_converge_within_two_seconds(
    spawn: Spawn, idp: DevIdentityProvider, own_redis: RedisServer
) -> None:
    (first, first_admin), (second, second_admin) = await two_services(spawn, idp, own_redis.url)
    token = await asyncio.to_thread(idp.mint)
    assert (await check(second.port, "/public/x", token)).http_status == 403  # no policies: nothing allowed
    async with aiohttp.ClientSession() as session:
        status, _ = await api(
            session, first_admin, "PUT", "/AccessPolicy/public", "engine: matcho\nmatcho: {uri: '#^/public'}\n"
        )
        assert status == 201
        assert (await check(first.port, "/public/x", token)).allowed  # this process: before the 201

        async def second_allows() -> bool:
            return (await check(second.port, "/public/x", token)).allowed

        assert await within(2.0, second_allows) < 2.0
        status, _ = await api(session, second_admin, "DELETE", "/AccessPolicy/public")
        assert status == 200

        async def first_denies() -> bool:
            return (await check(first.port, "/public/x", token)).http_status == 403

        assert await within(2.0, first_denies) < 2.0


@pytest.mark.slow  # two service processes and a Redis restart
async def test_redis_restarting_in_the_middle(spawn: Spawn, idp: DevIdentityProvider, own_redis: RedisServer) -> None:
    (first, first_admin), (second, second_admin) = await two_services(spawn, idp, own_redis.url)
    token = await asyncio.to_thread(idp.mint)
    async with aiohttp.ClientSession() as session:
        status, _ = await api(
            session, first_admin, "PUT", "/AccessPolicy/public", "engine: matcho\nmatcho: {uri: '#^/public'}\n"
        )
        assert status == 201

        async def both(path: str, expected: int) -> bool:
            answers = [await check(s.port, path, token) for s in (first, second)]
            return all(a.http_status == expected for a in answers)

        await within(2.0, lambda: both("/private", 403))

        own_redis.kill()

        async def unreachable() -> bool:
            for admin in (first_admin, second_admin):
                async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                    body = await response.json()
                    if response.status != 200 or body["store"]["reachable"]:
                        return False
            return True

        await within(5.0, unreachable)
        # Deciding with what they have: the policy still holds on both.
        assert await both("/private", 403)
        assert await both("/public/x", 200)
        async with session.get(f"http://127.0.0.1:{first_admin}/metrics") as response:
            assert "authz_resource_store_up 0.0" in await response.text()
        status, body = await api(session, first_admin, "PUT", "/AccessPolicy/other", "engine: allow\n")
        assert status == 503
        assert "unreachable" in body["issue"][0]["diagnostics"]

        await asyncio.to_thread(own_redis.start)  # same port, same append-only file

        async def reachable() -> bool:
            async with session.get(f"http://127.0.0.1:{second_admin}/readyz") as response:
                return bool((await response.json())["store"]["reachable"])

        await within(5.0, reachable)
        status, _ = await api(session, second_admin, "GET", "/AccessPolicy/public")
        assert status == 200  # persisted through the restart
        status, _ = await api(session, second_admin, "DELETE", "/AccessPolicy/public")
        assert status == 200
        await within(2.0, lambda: both("/public/x", 403))  # the last policy gone: nothing allowed


# --------------------------------------------------------------------------- a store that goes back


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_store_whose_counter_goes_back_is_kept_out_until_it_moves_past(
    store: Callable[[], Awaitable[RedisStore]], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Redis restored from an older copy: generation 1 (one policy, since deleted) after 3."""
    one = await store()
    path = tmp_path / "config.yaml"
    path.write_text("introspectors: [{id: i, type: jwt, jwt: {iss: 'https://i', secret: s}}]\n")
    file = read_config_file(path)
    await one.update(put(policy("old", "#^/old")))
    await one.update(lambda _: [Change(("AccessPolicy", "old"), None)])
    await one.update(put(policy("new", "#^/new")))
    applied: list[list[str]] = []

    async def apply(config: Config, source: str) -> None:
        applied.append([p.id for p in config.policies])

    registry = CollectorRegistry()
    sync = ConfigSync(file, one, await one.load(), apply, StoreMetrics(registry))
    assert sync.write_floor == 3
    caplog.set_level(logging.WARNING, "authz_service")

    # The older copy: generation 1, with the policy deleted since.
    raw = one._client
    await raw.delete(one.data_key)
    await raw.hset(one.data_key, "AccessPolicy/old", json.dumps(policy("old", "#^/old")))
    await raw.set(one.generation_key, 1)
    assert await sync.refresh() is False
    assert applied == []  # the deleted policy is not back
    assert sync.regressed == 1
    assert sync.status()["store"]["regressed"] == {"generation": 1, "deciding_with": 3}
    assert registry.get_sample_value("authz_resource_store_regressions_total") == 1
    assert registry.get_sample_value("authz_resource_store_regressed") == 1
    went_back = [r for r in caplog.records if r.getMessage().startswith("resource store went back")]
    assert len(went_back) == 1
    assert went_back[0].levelno == logging.ERROR
    assert went_back[0].__dict__["fields"]["generation"] == 1
    assert await sync.refresh() is False  # polled again: no new count, no new line
    assert registry.get_sample_value("authz_resource_store_regressions_total") == 1

    # A file reload meanwhile composes the file with what is kept, not with the older copy.
    assert await sync.reload_file("sighup") is True
    assert applied == [["new"]]

    # The store back at the very content kept (a Redis that found its AOF after all): caught up.
    await raw.delete(one.data_key)
    await raw.hset(one.data_key, "AccessPolicy/new", json.dumps(policy("new", "#^/new")))
    await raw.set(one.generation_key, 3)
    assert await sync.refresh() is True
    assert "regressed" not in sync.status()["store"]
    assert registry.get_sample_value("authz_resource_store_regressed") == 0
    await raw.set(one.generation_key, 2)  # and behind again
    assert await sync.refresh() is False
    assert (sync.regressed, registry.get_sample_value("authz_resource_store_regressions_total")) == (2, 2)

    # Writes through the API land above what this process decides with: the store moves past.
    written = await one.update(put(policy("after", "#^/after")), floor=sync.write_floor)
    assert written.generation == 4
    assert await sync.refresh() is True
    assert applied[-1] == ["after", "new"]  # the store as it now is, taken deliberately by a write
    assert sync.regressed is None
    assert registry.get_sample_value("authz_resource_store_regressed") == 0
    assert "regressed" not in sync.status()["store"]


@pytest.mark.slow  # a Redis restart
async def test_a_redis_that_restarts_empty_leaves_the_last_policies_in_force(
    idp: DevIdentityProvider, own_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_with_api(
        {"backend": "redis", "url": own_redis.url}, introspectors=[jwks_introspector(idp)], authentication_only=False
    )
    service = await start_api_service(tmp_path / "config.yaml", config)
    try:
        token = await asyncio.to_thread(idp.mint)
        assert (
            await service.request("PUT", "/AccessPolicy/public", "engine: matcho\nmatcho: {uri: '#^/public'}\n")
        ).status == 201
        assert (await service.request("PUT", "/User/u", "name: U\n")).status == 201
        assert (await service.check("/public/x", token=token)).allowed
        caplog.set_level(logging.WARNING, "authz_service")

        # Restart without its data (no AOF to replay): an empty store at generation 0.
        await asyncio.to_thread(own_redis.kill, wipe=True)
        await asyncio.to_thread(own_redis.start)

        async def regressed() -> bool:
            store = (await service.request("GET", "/readyz", token=None)).body["store"]
            return bool(store["reachable"] and "regressed" in store)

        await within(10.0, regressed)
        ready = (await service.request("GET", "/readyz", token=None)).body["store"]
        assert ready["regressed"] == {"generation": 0, "deciding_with": 2}
        assert ready["resources"] == 2
        # The last known policy is still in force: what it allows, and nothing more.
        assert (await service.check("/public/x", token=token)).allowed
        assert (await service.check("/private", token=token)).http_status == 403
        assert (await service.request("GET", "/AccessPolicy/public")).status == 404  # the store itself is empty
        metrics = (await service.request("GET", "/metrics", token=None)).body
        assert _metric(metrics, "authz_resource_store_regressions_total") == 1
        assert _metric(metrics, "authz_resource_store_regressed") == 1
        assert _metric(metrics, "authz_resource_store_generation") == 2
        assert any(r.getMessage().startswith("resource store went back") for r in caplog.records)

        # An operator re-applies resources through the API: the write lands above generation 2, and
        # the store as it now is (this write only) decides: less than before, never more.
        put = await service.request("PUT", "/AccessPolicy/other", "engine: matcho\nmatcho: {uri: '#^/other'}\n")
        assert put.status == 201
        assert (await service.check("/other/x", token=token)).allowed
        assert (await service.check("/public/x", token=token)).http_status == 403
        metrics = (await service.request("GET", "/metrics", token=None)).body
        assert _metric(metrics, "authz_resource_store_regressed") == 0
        assert _metric(metrics, "authz_resource_store_generation") == 3
        assert "regressed" not in (await service.request("GET", "/readyz", token=None)).body["store"]
    finally:
        await service.close()
