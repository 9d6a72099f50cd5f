"""Keeps one process's effective config in step with its config file and its resource store.

The effective config is the config file plus the store's resources (store/resources.py). Three
things change it, all through `ConfigSync`, one at a time (an asyncio.Lock), each validated whole
before anything is swapped (a rejected change is logged and the running config kept):
- the store: polled every `poll_interval` (and woken by the Redis channel, or by the supervisor's
  SIGUSR1 after it wrote), loaded again when its version changed; a change found by polling alone
  waits until its version held for the store's `settle` seconds (a directory edited by hand);
- the config file: SIGHUP (read as it is then), and a poll every second of its inode, times and
  size (a Kubernetes ConfigMap update swaps a symlink; an editor renames or rewrites); a changed
  file is applied once the same content (its sha256) has been read on polls `FILE_SETTLE` seconds
  apart, so a file caught between two writes of a writer that pauses less than that is never applied;
- a write through the resource API in this process, which applies it before answering.
No change of state widens access on its own:
- a store that cannot be reached changes nothing: the process keeps deciding with what it has,
  and says so in /readyz and `authz_resource_store_up`;
- a store whose change counter went back (a Redis that restarted empty, or from an older copy)
  is not applied either: the resources last loaded are kept (logged, `/readyz`, and
  `authz_resource_store_regressions_total`) until the counter moves past the one this process
  decides with (a write through the API does that at once: see `write_floor`), or a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from authz_service.config.model import Config
from authz_service.errors import ConfigError
from authz_service.store.base import Key, Resource, ResourceStore, Snapshot, StoreError, key_text
from authz_service.store.resources import ConfigFile, compose, config_file, read_config_file, shadowed

log = logging.getLogger(__name__)

FILE_POLL_INTERVAL = 1.0  # seconds between stats of the config file
FILE_SETTLE = 1.0  # seconds a changed file's content must stay the same before it is applied
STARTUP_STORE_WAIT = 5.0  # seconds start-up waits for an unreachable store before giving up

Apply = Callable[[Config, str], Awaitable[None]]
"""Swap in a config (the service's reload); the second argument names the source of the change."""


class StoreMetrics:
    """The resource store as Prometheus sees it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "authz_resource_store_up",
            "1 when the resource store answered the last poll, 0 while it cannot be reached",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.generation = Gauge(
            "authz_resource_store_generation",
            "The store's change counter in the config this process decides with (redis backend)",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.resources = Gauge(
            "authz_resource_store_resources",
            "Resources from the store in the config this process decides with",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.regressions = Counter(
            "authz_resource_store_regressions",
            "Store contents refused because their change counter was behind the one this process decides "
            "with (a Redis that restarted empty or from an older copy); the resources last loaded are kept",
            registry=registry,
        )
        self.regressed = Gauge(
            "authz_resource_store_regressed",
            "1 while the store holds content older than the one this process decides with (and keeps)",
            registry=registry,
            multiprocess_mode="livemax",
        )


async def load_store(store: ResourceStore, wait: float = STARTUP_STORE_WAIT) -> Snapshot:
    """The store's content at start-up, waiting up to `wait` seconds for it to be reachable."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await store.load()
        except StoreError as err:
            if time.monotonic() >= deadline:
                raise
            log.warning("resource store unreachable; retrying", extra={"fields": {"error": err.message}})
            await asyncio.sleep(0.5)


class ConfigSync:
    """The config file, the store, and the snapshot this process decides with; see the module docstring."""

    def __init__(
        self,
        file: ConfigFile,
        store: ResourceStore | None,
        snapshot: Snapshot | None,
        apply: Apply | None,
        metrics: StoreMetrics | None = None,
        on_change: Callable[[], None] | None = None,
        on_reload: Callable[[str, str], None] | None = None,
    ) -> None:
        self.file = file
        self.store = store
        self.snapshot = snapshot  # what the running config was composed from
        self._apply = apply  # None: only keep the file current (the supervisor, which has no engine)
        self._metrics = metrics
        self._on_change = on_change  # after every apply and store up/down change (a worker's report)
        self._on_reload = on_reload  # (source, result): Metrics.reload, authz_config_reloads_total
        self.lock = asyncio.Lock()
        self.store_error: str | None = None  # why the last poll failed; None while reachable
        self._seen: str | None = snapshot.version if snapshot else None  # last version applied or rejected
        self._last_rejection: tuple[str, ...] = ()
        self.regressed: int | None = None  # the store's counter while it is behind the applied one
        if metrics is not None and snapshot is not None:
            self._count_applied(snapshot)
            metrics.up.set(1)

    @property
    def applied_version(self) -> str | None:
        return self.snapshot.version if self.snapshot else None

    @property
    def store_up(self) -> bool:
        return self.store_error is None

    @property
    def write_floor(self) -> int | None:
        """The change counter of the store content this process decides with: a write through the
        API puts the store's counter above it, so a write to a store that went back (restarted empty)
        is the operator taking the store as it now is, and every process applies it."""
        return self.snapshot.generation if self.snapshot is not None else None

    # -- the store -----------------------------------------------------------------------------

    async def refresh(self, source: str = "store", expect: str | None = None) -> bool:
        """Load the store and apply it if it changed; whether this process now decides with what
        the store held when this was called (StoreError if it cannot be reached). With `expect`
        (the version the watch saw settle), content of any other version is left for the next poll."""
        if self.store is None:
            return True
        async with self.lock:
            try:
                snapshot = await self.store.load()
            except StoreError as err:
                self._down(err)
                raise
            except ConfigError as err:
                self._up()
                self._rejected(source, err, "resource store content rejected; keeping the running config")
                return False
            self._up()
            if snapshot.version == self.applied_version:
                self._caught_up(snapshot.generation)  # e.g. a Redis restarted from its AOF after all
                self._seen = snapshot.version
                return True
            if snapshot.version == self._seen:
                return False  # rejected already, and logged
            if expect is not None and snapshot.version != expect:
                return False  # changed again since it settled: it has to settle again
            self._seen = snapshot.version
            if self._went_back(snapshot):
                return False
            try:
                config = await asyncio.to_thread(compose, self.file, snapshot.resources)
            except ConfigError as err:
                self._rejected(source, err, "resource store content rejected; keeping the running config")
                return False
            self._warn_shadowed(snapshot.resources)
            await self._swap(config, source)
            self.snapshot = snapshot
            if self._metrics is not None:
                self._count_applied(snapshot)
            self._changed()
            return True

    async def watch_store(self) -> None:
        """Forever: wait for an announcement or the poll interval, compare versions, refresh. A
        change found by polling alone is applied once its version held for the store's `settle`
        seconds (a directory edited file by file is not applied half-way); an announced one at once."""
        if self.store is None:
            return
        pending: tuple[str, float] | None = None  # (a changed version, when it was first seen)
        while True:
            announced = await self.store.wait_for_change(self.store.poll_interval)
            try:
                version = await self.store.version()
            except StoreError as err:
                self._down(err)
                continue
            self._up()
            behind_until_now = self.regressed is not None and version == self.applied_version
            if version not in (self.applied_version, self._seen) or behind_until_now:
                expect = None
                if not announced and self.store.settle > 0 and not behind_until_now:
                    seen = time.monotonic()
                    if pending is None or pending[0] != version:
                        pending = (version, seen)
                        continue
                    if seen - pending[1] < self.store.settle:
                        continue
                    expect = version
                pending = None
                try:
                    await self.refresh(expect=expect)
                except StoreError:
                    continue  # recorded by refresh: the next poll tries again
                except Exception as err:  # a failed apply must never end the watch
                    log.error("applying the resource store failed: %s", type(err).__name__)

    def _went_back(self, snapshot: Snapshot) -> bool:
        """Whether `snapshot` is older than the content this process decides with (its counter is
        behind): then it is kept out, logged and counted. Applying it would put back resources
        deleted since, or drop every policy at once; neither is anyone's decision."""
        applied = self.write_floor
        if snapshot.generation is None or applied is None or snapshot.generation >= applied:
            self._caught_up(snapshot.generation)
            return False
        first = self.regressed is None
        self.regressed = snapshot.generation
        (log.error if first else log.warning)(
            "resource store went back (restarted empty, or from an older copy); "
            "keeping the resources last loaded until its counter moves past them",
            extra={
                "fields": {
                    "store": self.store.description if self.store is not None else None,
                    "generation": snapshot.generation,
                    "deciding_with": applied,
                    "store_resources": len(snapshot.resources),
                    "kept_resources": len(self.snapshot.resources) if self.snapshot is not None else 0,
                }
            },
        )
        if self._metrics is not None:
            self._metrics.regressions.inc()
            self._metrics.regressed.set(1)
        if first:
            self._changed()
        return True

    def _caught_up(self, generation: int | None) -> None:
        """The store is no longer behind: say so once."""
        if self.regressed is None:
            return
        log.warning(
            "resource store is no longer behind the content kept; deciding with the store again",
            extra={"fields": {"generation": generation, "kept": self.write_floor}},
        )
        self.regressed = None
        if self._metrics is not None:
            self._metrics.regressed.set(0)
        self._changed()

    def _down(self, err: StoreError) -> None:
        if self.store_error is None:
            log.error(
                "resource store unreachable; deciding with the resources last loaded",
                extra={"fields": {"error": err.message}},
            )
        changed = self.store_error != err.message
        self.store_error = err.message
        if self._metrics is not None:
            self._metrics.up.set(0)
        if changed:
            self._changed()

    def _up(self) -> None:
        if self.store_error is not None:
            log.info("resource store reachable again")
            self.store_error = None
            self._changed()
        if self._metrics is not None:
            self._metrics.up.set(1)

    def _count_applied(self, snapshot: Snapshot) -> None:
        assert self._metrics is not None
        self._metrics.resources.set(len(snapshot.resources))
        if snapshot.generation is not None:
            self._metrics.generation.set(snapshot.generation)

    # -- the config file -----------------------------------------------------------------------

    async def reload_file(self, source: str = "sighup", text: str | None = None) -> bool:
        """Read the config file again (or take `text`, what the watch saw settle) and apply it with
        the store's resources; a bad file is logged and the running config kept. A `watch` reload
        of unchanged text does nothing."""
        path = self.file.path
        if path is None:
            return False
        async with self.lock:
            try:
                if text is None:
                    file = await asyncio.to_thread(read_config_file, path)
                else:
                    file = await asyncio.to_thread(config_file, text, None, path)
            except ConfigError as err:
                self._rejected(source, err, "config reload rejected; keeping the running config")
                return False
            if source == "watch" and file.digest == self.file.digest:
                return False
            snapshot = await self._latest()
            resources = snapshot.resources if snapshot else {}
            try:
                config = await asyncio.to_thread(compose, file, resources)
            except ConfigError as err:
                self._rejected(source, err, "config reload rejected; keeping the running config")
                return False
            self.file = file
            self._warn_shadowed(resources)
            await self._swap(config, source)
            if snapshot is not self.snapshot and snapshot is not None:
                self.snapshot = snapshot
                if self._metrics is not None:
                    self._count_applied(snapshot)
                self._changed()
            self._seen = self.applied_version  # store content rejected with the old file gets another look
            return True

    async def _latest(self) -> Snapshot | None:
        """The store's content now (the file is checked with it); what was applied if it cannot be read."""
        if self.store is None:
            return None
        try:
            snapshot = await self.store.load()
        except (StoreError, ConfigError):
            return self.snapshot  # the store watch reports it; the file change need not wait for it
        floor = self.write_floor
        if snapshot.generation is not None and floor is not None and snapshot.generation < floor:
            return self.snapshot  # went back: the store watch reports it; the file keeps what was applied
        return snapshot

    async def watch_file(self, interval: float = FILE_POLL_INTERVAL, settle: float = FILE_SETTLE) -> None:
        """Forever: stat the config file every `interval`; when it changed, read it, and apply the
        text once the same text (sha256) has been read on polls at least `settle` seconds apart. A
        writer that pauses for less than that between two writes is never caught in the middle."""
        path = self.file.path
        if path is None:
            return
        # Not stat'ed now: the file may have changed since it was read. The first poll reads it and
        # compares its content with what runs.
        stamp: tuple[int, int, int, int, int] | str | None = "unknown"
        pending: tuple[str, float] | None = None  # (sha256 of a changed text, when it was first read)
        missing_logged = False
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(_stamp, path)
            if now == stamp and pending is None:
                continue
            stamp = now
            data = await asyncio.to_thread(_read_bytes, path)
            if data is None:
                pending = None
                if not missing_logged:
                    log.warning("config file is gone; keeping the running config", extra={"fields": {"path": path}})
                    missing_logged = True
                continue
            missing_logged = False
            digest = hashlib.sha256(data).hexdigest()  # as ConfigFile.digest, for UTF-8 text
            if digest == self.file.digest:
                pending = None  # back to what runs (or touched): nothing to apply
                continue
            seen = time.monotonic()
            if pending is None or pending[0] != digest:
                pending = (digest, seen)  # changed, or still changing: wait for it to settle
                continue
            if seen - pending[1] < settle:
                continue
            pending = None
            if not data.strip():
                log.warning("config file is empty; keeping the running config", extra={"fields": {"path": path}})
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None  # read_config_file says what is wrong with it
            try:
                await self.reload_file("watch", text)
            except Exception as err:  # a reload must never end the watch
                log.error("config reload failed: %s", type(err).__name__)

    async def applied(self) -> tuple[int, str] | None:
        """After a write through the API: apply the store's content now. None when this process
        decides with it, else (HTTP status, why not); the write itself is persisted."""
        try:
            ok = await self.refresh("api")
        except StoreError as err:
            return 503, f"this process could not load it back ({err.message})"
        if ok:
            return None
        if self.regressed is not None:
            return 503, "this process keeps newer resources than the store holds (see its log and /readyz)"
        return 500, "this process rejected the store's content (see its log)"

    # -- shared --------------------------------------------------------------------------------

    def compose(self, resources: Mapping[Key, Resource]) -> Config:
        """The effective config with these store resources (ConfigError listing every problem)."""
        return compose(self.file, resources)

    def status(self) -> dict[str, Any]:
        """The store as /readyz reports it."""
        if self.store is None:
            return {}
        store: dict[str, Any] = {
            "backend": self.store.backend,
            "reachable": self.store_up,
            "version": self.applied_version,
            "resources": len(self.snapshot.resources) if self.snapshot else 0,
        }
        if self.store_error is not None:
            store["error"] = self.store_error
            store["note"] = "deciding with the resources last loaded"
        if self.regressed is not None:
            store["regressed"] = {"generation": self.regressed, "deciding_with": self.write_floor}
            store["note"] = (
                "the store went back (restarted empty, or from an older copy); deciding with the resources "
                "last loaded until a write moves its counter past them (docs/resources.md)"
            )
        return {"store": store}

    async def _swap(self, config: Config, source: str) -> None:
        if self._apply is not None:
            try:
                await self._apply(config, source)
            except BaseException:
                self._count_reload(source, "error")
                raise
        self._count_reload(source, "ok")
        self._last_rejection = ()

    def _rejected(self, source: str, err: ConfigError, message: str) -> None:
        self._count_reload(source, "invalid")
        problems = tuple(str(p) for p in err.problems)
        if source == "store" and problems == self._last_rejection:
            return  # the same content polled again: logged once
        self._last_rejection = problems
        log.error(message, extra={"fields": {"source": source, "problems": list(problems)}})

    def _count_reload(self, source: str, result: str) -> None:
        if self._on_reload is not None:
            self._on_reload(source, result)

    def _warn_shadowed(self, resources: Mapping[Key, Resource]) -> None:
        hidden = shadowed(self.file, resources)
        if hidden:
            log.warning(
                "store resources with ids the config file defines are ignored (the file wins)",
                extra={"fields": {"resources": [key_text(k) for k in hidden]}},
            )

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


def _read_bytes(path: str) -> bytes | None:
    """The config file's content as it is now; None when it cannot be read (gone)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _stamp(path: str) -> tuple[int, int, int, int, int] | None:
    """What changes when the file does, following symlinks (a ConfigMap's `..data` swap)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


# -- workers report to the supervisor --------------------------------------------------------------


def status_file(directory: str, pid: int) -> Path:
    """Where a supervised worker reports the store version it decides with."""
    return Path(directory) / f"store-{pid}.json"


def write_status(path: Path, sync: ConfigSync) -> None:
    """Report atomically (temp file and rename): the supervisor never reads half a report."""
    report = {
        "version": sync.applied_version,
        "generation": sync.write_floor,
        "store_up": sync.store_up,
        "error": sync.store_error,
        "regressed": sync.regressed,
    }
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report))
    os.replace(temporary, path)


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None
