"""One serving process: the gRPC server, the admin server, health, and the current Engine.

`serve` runs one process until SIGTERM (drain, then stop) and reloads on SIGHUP. Supervised
workers (server/workers.py) run this same function; this module never imports workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from authz_service import loop
from authz_service.config.model import Config
from authz_service.config.validate import load_config
from authz_service.engine import Engine, build_engine
from authz_service.errors import ConfigError
from authz_service.observe import Metrics, log_internal_error
from authz_service.server.admin import AdminServer
from authz_service.server.grpc import HEALTH_SERVICES, AuthorizationServicer, bind, create_server
from authz_service.server.http import HttpAuthServer
from authz_service.tokens.cache import CacheFactory
from authz_service.upstream import UpstreamClient

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def ready_marker(directory: str, pid: int) -> Path:
    """The file a supervised worker creates once it is SERVING (the supervisor's readiness)."""
    return Path(directory) / f"ready-{pid}"


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Serving as worker `index` of a supervisor: shared port, maybe an own port, no admin server."""

    index: int
    metrics_dir: str


class AuthzService:
    """One serving process: the gRPC server, its health state and the current Engine."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.metrics = Metrics(registry or CollectorRegistry())
        self.client = UpstreamClient(on_call=self.metrics.upstream_call)
        self.caches = CacheFactory(config.cache, on_event=self.metrics.cache_event)
        self.engine = build_engine(config, self.client, self.caches, on_cache_event=self.caches.stats.count)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.admin: AdminServer | None = None
        self.http: HttpAuthServer | None = None
        self.port: int | None = None
        # Ready once the config is loaded and every JWKS had its first fetch attempt; not while draining.
        self.ready = False

    @property
    def config(self) -> Config:
        return self.engine.config

    def current_engine(self) -> Engine:
        """The engine new checks start on."""
        return self.engine

    async def start(self, *, reuse_port: bool = False, worker: WorkerSlot | None = None) -> int:
        """Bind, serve, and report SERVING; returns the bound port.

        As a supervisor's worker: the port is shared (SO_REUSEPORT), the worker may also bind
        its own port (worker_base_port + index), and the supervisor serves the admin endpoints.
        """
        server = create_server(
            AuthorizationServicer(self.current_engine, self.metrics), self.health, reuse_port=reuse_port
        )
        for name in HEALTH_SERVICES:
            # grpc's HealthServicer reports "" as SERVING by default; not before keys are warm.
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        settings = self.config.server
        addresses = [settings.grpc_address]
        if worker is not None and settings.worker_base_port is not None:
            host = settings.grpc_address.rpartition(":")[0]
            addresses.append(f"{host}:{settings.worker_base_port + worker.index}")
        port = bind(server, addresses, settings.tls)[0]
        await server.start()
        self._server = server
        self.port = port
        if settings.http_address is not None:
            # Workers share the HTTP port as they share the gRPC one (SO_REUSEPORT).
            self.http = HttpAuthServer(
                settings.http_address,
                self.current_engine,
                self.metrics,
                lambda: self.ready,
                reuse_port=reuse_port,
                shutdown_grace=settings.shutdown_grace,
            )
            await self.http.start()
        if settings.admin_address is not None and worker is None:
            self.admin = AdminServer(
                settings.admin_address, self.metrics.registry, lambda: self.ready, self.refresh_gauges
            )
            await self.admin.start()
        await self.engine.warm_up()
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        log.info(
            "serving",
            extra={"fields": {"grpc_port": port, "loop": loop.loop_name(), "summary": self.config.summary()}},
        )
        return port

    async def reload(self, config: Config) -> None:
        """Swap in a new config atomically; checks in flight finish on the engine they started with."""
        old = self.engine
        for section in ("server", "cache"):
            if getattr(config, section) != getattr(old.config, section):
                log.warning("config section %r changed: it takes effect only after a restart", section)
        config = dataclasses.replace(config, server=old.config.server, cache=old.config.cache)
        engine = build_engine(config, self.client, self.caches, previous=old, on_cache_event=self.caches.stats.count)
        await engine.warm_up()
        self.engine = engine
        kept = [ident for ident, built in engine.built.items() if old.built.get(ident) is built]
        log.info("config reloaded", extra={"fields": {"summary": config.summary(), "kept_introspectors": kept}})

    async def stop(self, grace: float | None = None, drain_delay: float = 0.0) -> None:
        """NOT_SERVING, keep answering for drain_delay (Envoy's health checks move traffic away),
        then stop accepting and give in-flight checks `grace` seconds."""
        self.ready = False
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

    def refresh_gauges(self) -> None:
        """Gauges that are read, not counted (JWKS staleness), just before a scrape."""
        for ident, seconds in self.engine.jwks_staleness().items():
            self.metrics.jwks_staleness.labels(ident).set(seconds)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: Config, path: str | None = None, *, worker: WorkerSlot | None = None) -> None:
    """Run one process until SIGTERM (or SIGINT), then drain and return. SIGHUP reloads `path`."""
    service = AuthzService(config)
    await service.start(reuse_port=worker is not None, worker=worker)
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    running.add_signal_handler(signal.SIGTERM, stop.set)
    background: list[asyncio.Task[None]] = []
    marker = None
    if worker is None:
        running.add_signal_handler(signal.SIGINT, stop.set)
    else:
        # Ctrl-C reaches the whole process group; only the supervisor acts on it (by SIGTERM).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        marker = ready_marker(worker.metrics_dir, os.getpid())
        marker.touch()
        background.append(asyncio.ensure_future(_refresh_gauges_forever(service)))
    reloads: set[asyncio.Task[None]] = set()
    if path is not None:

        def on_hup() -> None:
            task = asyncio.ensure_future(_reload_from(service, path))
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


async def _reload_from(service: AuthzService, path: str) -> None:
    """SIGHUP: read and validate the file off the loop; a bad config is logged and the old one kept."""
    try:
        config = await asyncio.get_running_loop().run_in_executor(None, load_config, path)
    except ConfigError as err:
        log.error(
            "config reload rejected; keeping the running config",
            extra={"fields": {"problems": [str(p) for p in err.problems]}},
        )
        return
    try:
        await service.reload(config)
    except Exception as err:
        log_internal_error(err)
