"""No change of state widens access: a config file caught half-written (by the watch or by SIGHUP)
and the last policy deleted through the API make the service deny more, never allow more.
(A Redis store that restarts empty: tests/integration/test_store_redis.py.)"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from authz_service.config.model import Config
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.server.service import AuthzService
from authz_service.server.sync import ConfigSync
from authz_service.store.resources import read_config_file
from tests.api_harness import ApiService, config_with_api, start_api_service
from tests.conftest import Spawn, Spawned, jwks_introspector
from tests.harness import Answer, AuthorizationClient, check_request

PUBLIC = {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public"}}
SERVER = {"grpc_address": "127.0.0.1:0", "admin_address": None, "drain_delay": 0}


class FileService:
    """A service started from a config file (AuthzService.from_file, as `serve` starts one)."""

    def __init__(self, service: AuthzService, path: Path) -> None:
        self.service = service
        self.path = path
        assert service.port is not None
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        self.stub = AuthorizationClient(self.channel)

    async def check(self, path: str, token: str) -> Answer:
        return Answer.of(await self.stub.Check(check_request(path, token=token), timeout=10))

    def policies(self) -> list[str]:
        return [p.id for p in self.service.config.policies]

    async def close(self) -> None:
        await self.channel.close()
        await self.service.stop(0)


@pytest.fixture
async def from_file(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[FileService]]]:
    started: list[FileService] = []

    async def start(text: str) -> FileService:
        path = tmp_path / "config.yaml"
        await asyncio.to_thread(path.write_text, text)
        service = await AuthzService.from_file(str(path))
        await service.start()
        running = FileService(service, path)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.close()


async def until(probe: Callable[[], bool], within: float, what: str) -> None:
    """Poll `probe` (bounded): the watch works on its own schedule."""
    deadline = time.monotonic() + within
    while not probe():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


class Hammer:
    """Checks of one request, back to back, until stopped: how many of each answer."""

    def __init__(self, service: FileService, path: str, token: str) -> None:
        self.seen: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(service, path, token))

    async def _run(self, service: FileService, path: str, token: str) -> None:
        while not self._stop.is_set():
            answer = await service.check(path, token)
            self.seen["allow" if answer.allowed else answer.response.status.message] += 1

    async def stop(self) -> collections.Counter[str]:
        self._stop.set()
        await self._task
        return self.seen


def chunks(idp: DevIdentityProvider, policies: list[dict[str, Any]]) -> tuple[str, str]:
    """A config file's text in two pieces: the first is valid YAML on its own (server and
    introspectors, no policies), the second adds the policies."""
    first = yaml.safe_dump({"server": SERVER, "introspectors": [jwks_introspector(idp)]}, sort_keys=False)
    return first, yaml.safe_dump({"policies": policies}, sort_keys=False)


def write_first(path: Path, text: str) -> Any:
    """Open (truncating) and write the first chunk, flushed to the file; the handle stays open."""
    handle = path.open("w")
    handle.write(text)
    handle.flush()
    os.fsync(handle.fileno())
    return handle


def write_rest(handle: Any, text: str) -> None:
    handle.write(text)
    handle.flush()
    handle.close()


@pytest.mark.slow  # a 3 s gap between the two writes, by definition
async def test_a_file_written_in_two_chunks_3s_apart_never_allows_more(
    from_file: Callable[[str], Awaitable[FileService]], idp: DevIdentityProvider
) -> None:
    first, rest = chunks(idp, [PUBLIC])
    service = await from_file(first + rest)
    token = await asyncio.to_thread(idp.mint)
    assert (await service.check("/public/x", token)).allowed
    assert (await service.check("/private", token)).http_status == 403
    hammer = Hammer(service, "/private", token)  # a path the policy denies, asked the whole time

    handle = await asyncio.to_thread(write_first, service.path, first)
    await asyncio.sleep(3.0)  # the writer's pause: longer than the settle period
    # Longer than the settle period, so the first chunk is applied (at most ~2 s after it was
    # written; a loaded machine may take longer): valid YAML without policies.
    await until(lambda: service.policies() == [], 10.0, "the first chunk applied")
    between = await service.check("/public/x", token)
    # ... which now denies every token (no_policies), instead of allowing every token.
    assert (between.http_status, between.response.status.message) == (403, "no_policies")

    await asyncio.to_thread(write_rest, handle, rest)
    await until(lambda: service.policies() == ["public"], 10.0, "the whole file applied")
    seen = await hammer.stop()
    assert seen["allow"] == 0, seen  # not one wrong allow, at any moment
    assert seen["no_policies"] > 0, seen  # the checks did run while the first chunk decided
    assert (await service.check("/public/x", token)).allowed  # the full config decides again
    assert (await service.check("/private", token)).http_status == 403


@pytest.mark.slow  # the settle period, on the wall clock
async def test_a_file_written_in_two_chunks_quickly_is_applied_once_whole(
    from_file: Callable[[str], Awaitable[FileService]],
    idp: DevIdentityProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, rest = chunks(idp, [PUBLIC])
    service = await from_file(first + rest)
    token = await asyncio.to_thread(idp.mint)
    caplog.set_level(logging.INFO, "authz_service")
    hammer = Hammer(service, "/public/x", token)  # allowed before and after; never no_policies between

    _, new_rest = chunks(idp, [{**PUBLIC, "id": "public-v2"}])
    handle = await asyncio.to_thread(write_first, service.path, first)
    await asyncio.sleep(0.3)  # the writer's pause: shorter than the settle period
    await asyncio.to_thread(write_rest, handle, new_rest)
    await until(lambda: service.policies() == ["public-v2"], 10.0, "the whole file applied")
    seen = await hammer.stop()
    assert seen["no_policies"] == 0, seen  # the first chunk alone never decided
    assert seen["allow"] > 0, seen
    reloads = [r for r in caplog.records if r.getMessage() == "config reloaded"]
    assert [r.__dict__["fields"]["source"] for r in reloads] == ["watch"]  # once, with the whole file


async def test_deleting_the_last_policy_through_the_api_denies_every_token(
    tmp_path: Path, idp: DevIdentityProvider
) -> None:
    """The config file has no policies of its own (and does not declare authentication_only)."""
    config = config_with_api(
        {"backend": "file", "path": str(tmp_path / "store")}, introspectors=[jwks_introspector(idp)]
    )
    service: ApiService = await start_api_service(tmp_path / "config.yaml", config)
    try:
        token = await asyncio.to_thread(idp.mint)
        put = await service.request("PUT", "/AccessPolicy/public", "engine: matcho\nmatcho: {uri: '#^/public'}\n")
        assert put.status == 201
        assert (await service.check("/public/x", token=token)).allowed
        deleted = await service.request("DELETE", "/AccessPolicy/public")
        assert deleted.status == 200
        after = await service.check("/public/x", token=token)
        # Not "no policies, so authentication only": a valid token is now denied.
        assert (after.http_status, after.response.status.message) == (403, "no_policies")
        assert (await service.request("GET", "/AccessPolicy")).body["total"] == 0
    finally:
        await service.close()


# --------------------------------------------------------------------------- SIGHUP


async def _check(port: int, path: str, token: str) -> Answer:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return Answer.of(await AuthorizationClient(channel).Check(check_request(path, token=token), timeout=10))


async def _logged(spawned: Spawned, message: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Wait (bounded) until the service's log has `count` lines with this message."""
    deadline = time.monotonic() + timeout
    while True:
        text = await asyncio.to_thread(spawned.log.read_text)
        found = [json.loads(line) for line in text.splitlines() if line.startswith("{") and f'"{message}"' in line]
        found = [line for line in found if line.get("msg") == message]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{count} x {message!r} not logged within {timeout} s"
        await asyncio.sleep(0.05)


@pytest.mark.slow  # a service subprocess
async def test_sighup_with_a_half_written_file_never_allows_more(spawn: Spawn, idp: DevIdentityProvider) -> None:
    spawned = await spawn({"introspectors": [jwks_introspector(idp)], "policies": [PUBLIC]})
    token = await asyncio.to_thread(idp.mint)
    whole = spawned.path.read_text()
    data = yaml.safe_load(whole)
    first = yaml.safe_dump({k: v for k, v in data.items() if k != "policies"}, sort_keys=False)
    assert (await _check(spawned.port, "/public/x", token)).allowed

    # Cut inside the policy: not a valid config. Refused; the running config stays.
    cut = first + "policies:\n- id: public\n  engine: matc"
    spawned.path.write_text(cut)
    spawned.process.send_signal(signal.SIGHUP)
    rejected = await _logged(spawned, "config reload rejected; keeping the running config", 1)
    assert any("policy 'public'" in p for p in rejected[0]["problems"])
    assert (await _check(spawned.port, "/public/x", token)).allowed
    assert (await _check(spawned.port, "/private", token)).http_status == 403

    # Cut before the policies: a valid config without policies. Applied, and it denies every token.
    spawned.path.write_text(first)
    spawned.process.send_signal(signal.SIGHUP)
    await _logged(spawned, "config reloaded", 1)
    for path in ("/public/x", "/private"):
        answer = await _check(spawned.port, path, token)
        assert (answer.http_status, answer.response.status.message) == (403, "no_policies")

    # The rest of the file, and another SIGHUP: the policy decides again (the file watch may apply
    # it too, so wait for the answer rather than for a count of log lines).
    spawned.path.write_text(whole)
    spawned.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not (await _check(spawned.port, "/public/x", token)).allowed:
        assert time.monotonic() < deadline, "the whole file was not applied within 10 s"
        await asyncio.sleep(0.05)
    assert (await _check(spawned.port, "/private", token)).http_status == 403


# --------------------------------------------------------------------------- the file store, edited by hand


@pytest.mark.slow  # the store's settle period, on the wall clock
async def test_a_store_file_rewritten_in_two_chunks_is_not_applied_half_way(
    tmp_path: Path, idp: DevIdentityProvider
) -> None:
    """A `git checkout` or an editor writing a store file in place: the first chunk alone is a
    valid and wider policy (any user on /admin); it must never decide."""
    store = tmp_path / "store"
    store.mkdir()
    target = store / "AccessPolicy.admins.yaml"
    target.write_text("engine: matcho\nmatcho:\n  uri: '#^/admin'\n  jwt: {sub: root}\n")
    config = config_with_api(
        {"backend": "file", "path": str(store)}, token=None, introspectors=[jwks_introspector(idp)]
    )
    service = await start_api_service(tmp_path / "config.yaml", config)
    try:
        bob = await asyncio.to_thread(idp.mint, {"sub": "bob"})
        admin = await asyncio.to_thread(idp.mint, {"sub": "admin"})
        assert (await service.check("/admin/x", token=bob)).http_status == 403
        seen: collections.Counter[str] = collections.Counter()
        stop = asyncio.Event()

        async def hammer() -> None:
            while not stop.is_set():
                answer = await service.check("/admin/x", token=bob)
                seen["allow" if answer.allowed else answer.response.status.message] += 1

        task = asyncio.ensure_future(hammer())
        handle = await asyncio.to_thread(write_first, target, "engine: matcho\nmatcho:\n  uri: '#^/admin'\n")
        await asyncio.sleep(0.7)  # the writer's pause: longer than a poll, shorter than the settle period
        await asyncio.to_thread(write_rest, handle, "  jwt: {sub: admin}\n")
        deadline = time.monotonic() + 10
        while not (await service.check("/admin/x", token=admin)).allowed:
            assert time.monotonic() < deadline, "the rewritten file was not applied within 10 s"
            await asyncio.sleep(0.05)
        stop.set()
        await task
        assert seen["allow"] == 0, seen  # bob was never let in by the first chunk
        assert sum(seen.values()) > 0
        assert (await service.check("/admin/x", token=bob)).http_status == 403
    finally:
        await service.close()


@pytest.mark.parametrize("settle", [1.5, 0.0])
async def test_the_watch_applies_a_file_only_once_its_content_held_for_the_settle_period(
    tmp_path: Path, idp: DevIdentityProvider, settle: float
) -> None:
    """The watch itself, polling fast (0.2 s): with a settle period a first chunk that stays 0.9 s
    is never applied; without it (settle 0, the control) it is."""
    first, rest = chunks(idp, [PUBLIC])
    path = tmp_path / "config.yaml"
    path.write_text(first + rest)
    applied: list[list[str]] = []

    async def apply(config: Config, source: str) -> None:
        applied.append([p.id for p in config.policies])

    sync = ConfigSync(read_config_file(path), None, None, apply)
    watch = asyncio.ensure_future(sync.watch_file(interval=0.2, settle=settle))
    try:
        _, new_rest = chunks(idp, [{**PUBLIC, "id": "public-v2"}])
        handle = await asyncio.to_thread(write_first, path, first)
        await asyncio.sleep(0.9)  # the writer's pause: several polls, less than the settle period
        await asyncio.to_thread(write_rest, handle, new_rest)
        await until(lambda: bool(applied) and applied[-1] == ["public-v2"], 10.0, "the whole file applied")
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if settle:
        assert applied == [["public-v2"]]  # once, whole
    else:
        assert applied == [[], ["public-v2"]]  # the control: the first chunk did decide for a while
