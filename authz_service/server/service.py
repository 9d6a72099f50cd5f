"""One serving process: the gRPC server, the admin server, health, and the current Engine.

`serve` runs one process until SIGTERM (drain, then stop) and reloads on SIGHUP. Supervised
workers (server/workers.py) run this same function; this module never imports workers.

Readiness (gRPC health for "" and the Authorization service, /readyz, a worker's ready marker)
means the process can verify every introspector's tokens: it waits for the first keys of every
`jwks_uri` and `discovery` introspector not marked `optional` (fetched again with backoff until
they arrive). Once ready, a process stays ready until it drains: a reload that adds an
introspector whose IdP is down reaches every replica at once, and unready would take the whole
fleet out of every load balancer for one IdP; /readyz reports it instead (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from authz_service import loop
from authz_service.config.model import Config
from authz_service.decisionlog import DecisionLog, log_internal_error
from authz_service.engine import Engine, build_engine
from authz_service.errors import host_port
from authz_service.metrics import ApiMetrics, Metrics
from authz_service.server.admin import AdminServer
from authz_service.server.api import ResourceApi
from authz_service.server.grpc import HEALTH_SERVICES, AuthorizationServicer, bind, create_server
from authz_service.server.http import HttpAuthServer
from authz_service.server.runner import CheckRunner
from authz_service.server.sync import ConfigSync, StoreMetrics, load_store, status_file, write_status
from authz_service.store import open_store
from authz_service.store.base import ResourceStore, Snapshot
from authz_service.store.resources import compose, read_config_file
from authz_service.tokens.cache import CacheFactory
from authz_service.tracing import Spans
from authz_service.upstream import UpstreamClient

if TYPE_CHECKING:
    from authz_service.server.http_granian import GranianHttpServer

log = logging.getLogger(__name__)


def ready_marker(directory: str, pid: int) -> Path:
    """The file a supervised worker creates once it is ready, keys included (the supervisor's readiness)."""
    return Path(directory) / f"ready-{pid}"


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Serving as worker `index` of a supervisor: shared port, maybe an own port, no admin server."""

    index: int
    metrics_dir: str


class AuthzService:
    """One serving process: the gRPC server, its health state and the current Engine."""

    def __init__(
        self, config: Config, registry: CollectorRegistry | None = None, decisions: DecisionLog | None = None
    ) -> None:
        self.metrics = Metrics(registry or CollectorRegistry())
        # Where decision lines go: `serve` passes a writer thread on stderr; without one, stdlib logging.
        self.decisions = decisions or DecisionLog()
        self.metrics.track_decision_log(self.decisions.dropped)
        self.metrics.set_policies(
            (policy.id for policy in config.policies), dry_run=(p.id for p in config.policies if p.dry_run)
        )
        # Spans for checks and IdP calls when tracing.otlp_endpoint is set (fixed until a restart).
        tracing = config.tracing
        self.spans = (
            Spans.otlp(tracing.otlp_endpoint, tracing.service_name, tracing.sample_ratio)
            if tracing.otlp_endpoint is not None
            else Spans.off()
        )
        self.client = UpstreamClient(on_call=self.metrics.upstream_call, spans=self.spans)
        self.caches = CacheFactory(config.cache, on_event=self.metrics.cache_event)
        self.engine = build_engine(
            config,
            self.client,
            self.caches,
            on_cache_event=self.caches.stats.count,
            on_skipped_key=self.metrics.jwks_skipped_key,
            spans=self.spans,
        )
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.admin: AdminServer | None = None
        self.http: HttpAuthServer | GranianHttpServer | None = None
        self.port: int | None = None
        self.sync: ConfigSync | None = None  # the config file and resource store, when serving from a file
        self._watchers: list[asyncio.Task[None]] = []
        self._report_path: Path | None = None
        # SERVING: the config is loaded and every required JWKS introspector has keys; not while draining.
        self.ready = False
        self._draining = False
        self._engine_changed = asyncio.Event()  # a reload: readiness waits for another set of keys
        self._until_ready: asyncio.Task[None] | None = None
        self._on_ready: list[Callable[[], None]] = []

    @classmethod
    async def from_file(
        cls,
        path: str,
        *,
        registry: CollectorRegistry | None = None,
        report: Path | None = None,
        decisions: DecisionLog | None = None,
    ) -> AuthzService:
        """A service for the config file at `path` plus its resource store (`api.store`), loaded now:
        ConfigError when they are invalid together, StoreError when the store stays unreachable.
        Once started it watches both (and serves the resource API when `api.token` or `api.tokens` is set).
        `report`: where a supervised worker reports the store version it decides with."""
        file = await asyncio.to_thread(read_config_file, path)
        config = file.config
        store: ResourceStore | None = None
        snapshot: Snapshot | None = None
        if config.api.store is not None:
            store = open_store(config.api.store)
            await store.open()
            try:
                snapshot = await load_store(store)
                config = await asyncio.to_thread(compose, file, snapshot.resources)
            except BaseException:
                await store.close()
                raise
        service = cls(config, registry, decisions)
        metrics = StoreMetrics(service.metrics.registry) if store is not None else None
        service._report_path = report
        service.sync = ConfigSync(
            file,
            store,
            snapshot,
            service.reload,
            metrics,
            on_change=service._report,
            on_reload=service.metrics.reload,
        )
        return service

    @property
    def config(self) -> Config:
        return self.engine.config

    def current_engine(self) -> Engine:
        """The engine new checks start on."""
        return self.engine

    async def _engine_now(self) -> Engine:
        """The current engine, for test-policy (awaitable: a supervisor builds its own on demand)."""
        return self.engine

    async def start(self, *, reuse_port: bool = False, worker: WorkerSlot | None = None) -> int:
        """Bind, serve, and report SERVING; returns the bound port.

        As a supervisor's worker: the port is shared (SO_REUSEPORT), the worker may also bind
        its own port (worker_base_port + index), and the supervisor serves the admin endpoints.
        """
        checks = AuthorizationServicer(
            self.current_engine,
            self.metrics,
            log_decision=self.decisions.log_decision,
            log_internal_error=self.decisions.log_internal_error,
        )
        runners: list[CheckRunner[Any]] = [checks.runner]
        self.metrics.track_in_flight(lambda: sum(runner.in_flight for runner in runners))
        server = create_server(
            checks,
            self.health,
            reuse_port=reuse_port,
            max_concurrent_checks=self.config.server.max_concurrent_checks,
        )
        for name in HEALTH_SERVICES:
            # grpc's HealthServicer reports "" as SERVING by default; not before keys are warm.
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        settings = self.config.server
        addresses = [settings.grpc_address]
        if worker is not None and settings.worker_base_port is not None:
            addresses.append(host_port(settings.grpc_listen.host, settings.worker_base_port + worker.index))
        port = bind(server, addresses, settings.tls, reuse_port=reuse_port)[0]
        await server.start()
        self._server = server
        self.port = port
        if settings.http_listen is not None:
            # Workers share the HTTP port as they share the gRPC one (SO_REUSEPORT).
            # http_engine: granian (Rust, on this loop: server/http_granian.py) or aiohttp (server/http.py).
            http_server: type[HttpAuthServer | GranianHttpServer] = HttpAuthServer
            if settings.http_engine == "granian":
                # Imported off the loop: granian's package imports its whole CLI server (~0.1 s).
                module = await asyncio.to_thread(importlib.import_module, "authz_service.server.http_granian")
                http_server = module.GranianHttpServer
            self.http = http_server(
                settings.http_listen,
                self.current_engine,
                self.metrics,
                lambda: self.ready,
                details=self.readiness_details,
                log_decision=self.decisions.log_decision,
                log_internal_error=self.decisions.log_internal_error,
                reuse_port=reuse_port,
                shutdown_grace=settings.shutdown_grace,
                max_concurrent_checks=settings.max_concurrent_checks,
            )
            runners.append(self.http.runner)
            await self.http.start()
        if settings.admin_listen is not None and worker is None:
            api = None
            if self.config.api.enabled and self.sync is not None and self.sync.store is not None:
                api = ResourceApi(
                    self.config.api.writers,
                    self.sync,
                    self.config.api.max_body_bytes,
                    self._engine_now,
                    ApiMetrics(self.metrics.registry),
                )
            self.admin = AdminServer(
                settings.admin_listen,
                self.metrics.registry,
                lambda: self.ready,
                self.refresh_gauges,
                api=api,
                details=self.readiness_details,
                tls=settings.admin_tls,
                well_known=lambda: self.engine.well_known,
            )
            await self.admin.start()
        await self.engine.warm_up()
        self.engine.retry_missing_keys()
        if self.sync is not None:
            self._report()
            self._watchers.append(asyncio.ensure_future(self.sync.watch_file()))
            if self.sync.store is not None:
                self._watchers.append(asyncio.ensure_future(self.sync.watch_store()))
        if self.engine.readiness().ready:
            await self._become_ready()
        else:
            self._until_ready = asyncio.ensure_future(self._ready_once_keys_arrive())
        listeners = {"grpc": [host_port(settings.grpc_listen.host, port), *addresses[1:]]}
        if self.http is not None:
            listeners["http"] = [self.http.address]
        if self.admin is not None:
            listeners["admin"] = [f"{self.admin.scheme}://{self.admin.address}"]
        log.info(
            "serving",
            extra={
                "fields": {
                    "grpc_port": port,
                    "listeners": listeners,
                    "loop": loop.loop_name(),
                    "summary": self.config.summary(),
                    "ready": self.ready,
                }
            },
        )
        if not self.ready:
            waiting = [source.name for source in self.engine.keys_pending()]
            log.warning("not ready: waiting for keys", extra={"fields": {"introspectors": waiting}})
        return port

    def readiness_details(self) -> dict[str, Any]:
        """What /readyz says besides its status: each introspector's state, and the resource store's."""
        details: dict[str, Any] = {"introspectors": dict(self.engine.readiness().introspectors)}
        if self.sync is not None:
            details.update(self.sync.status())
        return details

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the process is ready (now, if it is)."""
        if self.ready:
            callback()
        else:
            self._on_ready.append(callback)

    async def _ready_once_keys_arrive(self) -> None:
        """Wait until the current engine's required key sources all have keys, then report SERVING."""
        while pending := self.engine.keys_pending():
            waits = [asyncio.ensure_future(source.keys_arrived.wait()) for source in pending]
            waits.append(asyncio.ensure_future(self._engine_changed.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            self._engine_changed.clear()
        await self._become_ready()

    async def _become_ready(self) -> None:
        if self._draining:
            return
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        log.info("ready", extra={"fields": {"introspectors": list(self.engine.built)}})
        callbacks, self._on_ready = self._on_ready, []
        for callback in callbacks:
            callback()

    async def reload(self, config: Config, source: str = "file") -> None:
        """Swap in a new config atomically; checks in flight finish on the engine they started with.
        `source` says what changed it (file, sighup, watch, store, api), for the log."""
        old = self.engine
        for section in ("server", "cache", "api", "tracing"):
            if getattr(config, section) != getattr(old.config, section):
                log.warning("config section %r changed: it takes effect only after a restart", section)
        config = dataclasses.replace(
            config, server=old.config.server, cache=old.config.cache, api=old.config.api, tracing=old.config.tracing
        )
        engine = build_engine(
            config,
            self.client,
            self.caches,
            previous=old,
            on_cache_event=self.caches.stats.count,
            on_skipped_key=self.metrics.jwks_skipped_key,
            spans=self.spans,
        )
        await engine.warm_up()
        self.engine = engine
        old.stop_retries(successor=engine)
        if not self._draining:
            engine.retry_missing_keys()
        self._engine_changed.set()
        self.metrics.set_policies(
            (policy.id for policy in config.policies), dry_run=(p.id for p in config.policies if p.dry_run)
        )
        kept = [ident for ident, built in engine.built.items() if old.built.get(ident) is built]
        # Once ready, a reload never makes the process unready (see the module docstring): the
        # introspectors still without keys are named here, in their fetch failures and in /readyz.
        pending = [
            ident for ident, built in engine.built.items() if built.jwks is not None and built.jwks.keyset is None
        ]
        log.info(
            "config reloaded",
            extra={
                "fields": {
                    "summary": config.summary(),
                    "kept_introspectors": kept,
                    "source": source,
                    "introspectors_without_keys": pending,
                }
            },
        )

    async def stop(self, grace: float | None = None, drain_delay: float = 0.0) -> None:
        """NOT_SERVING, keep answering for drain_delay (Envoy's health checks move traffic away),
        then stop accepting and give in-flight checks `grace` seconds."""
        self.ready = False
        self._draining = True
        if self._until_ready is not None:
            self._until_ready.cancel()
            self._until_ready = None
        self.engine.stop_retries()
        await self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            log.info("draining", extra={"fields": {"drain_delay_seconds": drain_delay}})
            await asyncio.sleep(drain_delay)
        grace = self.config.server.shutdown_grace if grace is None else grace
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.client.close()
        await self.caches.close()
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        await self.close_store()
        if self.spans.enabled:
            # The spans still buffered go out now (at most ~2 s, plus one export's 5 s timeout).
            await asyncio.to_thread(self.spans.shutdown)

    async def close_store(self) -> None:
        """Stop watching the config file and the store; release the store."""
        for task in self._watchers:
            task.cancel()
        self._watchers.clear()
        if self._report_path is not None:
            self._report_path.unlink(missing_ok=True)
        if self.sync is not None and self.sync.store is not None:
            await self.sync.store.close()

    def _report(self) -> None:
        """A supervised worker tells the supervisor which store version it decides with."""
        if self._report_path is not None and self.sync is not None:
            try:
                write_status(self._report_path, self.sync)
            except OSError as err:
                log.warning("cannot write the worker's store report: %s", err.strerror)

    def refresh_gauges(self) -> None:
        """Gauges that are read, not counted (JWKS staleness), just before a scrape."""
        self.metrics.refresh()
        for ident, seconds in self.engine.jwks_staleness().items():
            self.metrics.jwks_staleness.labels(ident).set(seconds)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: Config, path: str | None = None, *, worker: WorkerSlot | None = None) -> None:
    """Run one process until SIGTERM (or SIGINT), then drain and return.

    With `path`, the service decides with the config file plus its resource store, watches both,
    and reads the file again on SIGHUP (see `AuthzService.from_file` for what it raises).
    """
    # Decision lines go to stderr through a writer thread, so writing them never blocks the loop.
    decisions = DecisionLog.to_fd(sys.stderr.fileno(), logging.getLogger().level)
    try:
        await _serve(config, path, worker, decisions)
    finally:
        decisions.stop()


async def _serve(config: Config, path: str | None, worker: WorkerSlot | None, decisions: DecisionLog) -> None:
    if path is not None:
        report = status_file(worker.metrics_dir, os.getpid()) if worker is not None else None
        service = await AuthzService.from_file(path, report=report, decisions=decisions)
    else:
        service = AuthzService(config, decisions=decisions)
    config = service.config
    try:
        await service.start(reuse_port=worker is not None, worker=worker)
    except BaseException:
        # Whatever did bind is closed again (a grpc server left running would end the process in a
        # traceback as the loop closes), then the caller says which address failed, in one line.
        await service.stop(0)
        raise
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    running.add_signal_handler(signal.SIGTERM, stop.set)
    background: list[asyncio.Task[None]] = []
    sync = service.sync
    if sync is not None and sync.store is not None:
        # The supervisor wrote to the store: look now rather than at the next poll. Installed before
        # the ready marker exists: the supervisor signals only ready workers.
        running.add_signal_handler(signal.SIGUSR1, sync.store.announce)
    marker = None
    if worker is None:
        running.add_signal_handler(signal.SIGINT, stop.set)
    else:
        # Ctrl-C reaches the whole process group; only the supervisor acts on it (by SIGTERM).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        marker = ready_marker(worker.metrics_dir, os.getpid())
        # Only once every required introspector has keys: the supervisor's /readyz is ready when all
        # its workers are (and it signals, and waits on API writes for, only those).
        service.on_ready(marker.touch)
        background.append(asyncio.ensure_future(_refresh_gauges_forever(service)))
    reloads: set[asyncio.Task[None]] = set()
    if sync is not None:

        def on_hup() -> None:
            assert sync is not None
            task = asyncio.ensure_future(_reload_from(sync))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        running.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    log.info("shutting down", extra={"fields": {"grace_seconds": config.server.shutdown_grace}})
    if marker is not None:
        marker.unlink(missing_ok=True)
    for task in background:
        task.cancel()
    await service.stop(drain_delay=config.server.drain_delay)


async def _refresh_gauges_forever(service: AuthzService, every: float = 5.0) -> None:
    """Workers have no scrape hook of their own: keep read-only gauges fresh for the supervisor."""
    while True:
        service.refresh_gauges()
        await asyncio.sleep(every)


async def _reload_from(sync: ConfigSync) -> None:
    """SIGHUP: read and validate the file off the loop; a bad config is logged and the old one kept."""
    try:
        await sync.reload_file("sighup")
    except Exception as err:
        log_internal_error(err)
