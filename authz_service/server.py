"""The gRPC shell: ext_authz Check, grpc.health.v1 and server reflection on one grpc.aio server.

The servicer only converts: CheckRequest -> HttpRequest, Authorizer -> Decision,
ResponseBuilder -> CheckResponse. Everything that decides lives in decide.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2
from authz_service.admin import AdminServer
from authz_service.config import Config, TlsConfig, load_config
from authz_service.decide import Authorizer, build_introspectors, log_internal_error
from authz_service.envoy import ResponseBuilder, to_http_request
from authz_service.errors import ConfigError
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.observe import Metrics, log_decision
from authz_service.tokens.cache import CacheFactory
from authz_service.tokens.jwks import JwksKeySource
from authz_service.upstream import UpstreamClient

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
HEALTH_SERVICES = ("", AUTHORIZATION_SERVICE)
_INTERNAL_ERROR = Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)
_EMPTY_REQUEST = HttpRequest()


@dataclass(frozen=True, slots=True)
class Engine:
    """Everything built from one config; swapped as a whole on reload."""

    config: Config
    authorizer: Authorizer
    responses: ResponseBuilder


def build_engine(
    config: Config, client: UpstreamClient, caches: CacheFactory, previous: Engine | None = None
) -> Engine:
    """The Authorizer and ResponseBuilder for a config (reusing unchanged introspectors of `previous`)."""
    introspectors = build_introspectors(config, client, caches, previous.authorizer.introspectors if previous else None)
    authorizer = Authorizer(config, introspectors, on_cache_event=caches.stats.count)
    return Engine(config, authorizer, ResponseBuilder(config.response))


class AuthorizationServicer:
    """envoy.service.auth.v3.Authorization: converts at the edges, never raises."""

    def __init__(self, service: AuthzService) -> None:
        self._service = service
        self._metrics = service.metrics

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """The answer, already serialized (see ResponseBuilder.encode)."""
        started = time.perf_counter()
        engine = self._service.engine
        http = _EMPTY_REQUEST
        try:
            http = to_http_request(request)
            decision = await engine.authorizer.check(http)
            response = engine.responses.encode(decision)
        except Exception as err:  # fail closed, keep serving
            log_internal_error(err)
            decision = _INTERNAL_ERROR
            response = engine.responses.encode(decision)
        elapsed = time.perf_counter() - started
        self._metrics.observe(decision, elapsed)
        log_decision(http, decision, elapsed, engine.config.logging.decisions)
        return response


class AuthzService:
    """One serving process: the gRPC server, its health state and the current Engine."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.metrics = Metrics(registry or CollectorRegistry())
        self.client = UpstreamClient(on_call=self.metrics.upstream_call)
        self.caches = CacheFactory(config.cache, on_event=self.metrics.cache_event)
        self.engine = build_engine(config, self.client, self.caches)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.admin: AdminServer | None = None
        self.port: int | None = None
        # Ready once the config is loaded and every JWKS had its first fetch attempt; not while draining.
        self.ready = False

    @property
    def config(self) -> Config:
        return self.engine.config

    async def start(self, *, reuse_port: bool = False, worker: int | None = None) -> int:
        """Bind, serve, and report SERVING; returns the bound port.

        As worker i of a supervisor: the port is shared (SO_REUSEPORT), the worker may also bind
        its own port (worker_base_port + i), and the supervisor serves the admin endpoints.
        """
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                # grpc cancels requests past 1,000 pending on a server; a burst from one Envoy
                # can exceed that. Queue more (memory is bounded by the message cap) rather than drop.
                ("grpc.server.max_pending_requests", 10_000),
                ("grpc.server.max_pending_requests_hard_limit", 10_000),
            ]
        )
        # Registered by hand rather than with the generated add_..._to_server: the same method path,
        # but no response_serializer, because Check returns bytes it has already encoded.
        check: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
            AuthorizationServicer(self).Check,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=None,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, {"Check": check}),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                AUTHORIZATION_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        for name in HEALTH_SERVICES:
            # grpc's HealthServicer reports "" as SERVING by default; not before keys are warm.
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        settings = self.config.server
        addresses = [settings.grpc_address]
        if worker is not None and settings.worker_base_port is not None:
            addresses.append(f"{settings.grpc_address.rpartition(':')[0]}:{settings.worker_base_port + worker}")
        ports = [_bind(server, address, settings.tls) for address in addresses]
        port = ports[0]
        await server.start()
        self._server = server
        self.port = port
        if settings.admin_address is not None and worker is None:
            self.admin = AdminServer(
                settings.admin_address, self.metrics.registry, lambda: self.ready, self.refresh_gauges
            )
            await self.admin.start()
        await self.engine.authorizer.warm_up()
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        from authz_service.loop import loop_name

        log.info(
            "serving", extra={"fields": {"grpc_port": port, "loop": loop_name(), "summary": self.config.summary()}}
        )
        return port

    async def reload(self, config: Config) -> None:
        """Swap in a new config atomically; checks in flight finish on the engine they started with."""
        old = self.engine
        for section in ("server", "cache"):
            if getattr(config, section) != getattr(old.config, section):
                log.warning("config section %r changed: it takes effect only after a restart", section)
        config = dataclasses.replace(config, server=old.config.server, cache=old.config.cache)
        engine = build_engine(config, self.client, self.caches, previous=old)
        await engine.authorizer.warm_up()
        self.engine = engine
        kept = [
            i
            for i in engine.authorizer.introspectors
            if old.authorizer.introspectors.get(i) is engine.authorizer.introspectors[i]
        ]
        log.info("config reloaded", extra={"fields": {"summary": config.summary(), "kept_introspectors": kept}})

    async def stop(self, grace: float | None = None, drain_delay: float = 0.0) -> None:
        """NOT_SERVING, keep answering for drain_delay (Envoy's health checks move traffic away),
        then stop accepting and give in-flight checks `grace` seconds."""
        self.ready = False
        await self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            log.info("draining", extra={"fields": {"drain_delay_seconds": drain_delay}})
            await asyncio.sleep(drain_delay)
        if self._server is not None:
            await self._server.stop(self.config.server.shutdown_grace if grace is None else grace)
            self._server = None
        await self.client.close()
        await self.caches.close()
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None

    def refresh_gauges(self) -> None:
        for introspector in self.engine.authorizer.introspectors.values():
            source = getattr(introspector, "key_source", None)
            if isinstance(source, JwksKeySource):
                self.metrics.jwks_staleness.labels(introspector.id).set(source.staleness())

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _bind(server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Listen on address, with TLS (and client certificates) when configured; the bound port."""
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials(
            [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=tls.client_ca is not None
        )
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port


async def serve(
    config: Config, path: str | None = None, *, reuse_port: bool = False, worker: int | None = None
) -> None:
    """Run one process until SIGTERM (or SIGINT), then drain and return. SIGHUP reloads `path`."""
    service = AuthzService(config)
    await service.start(reuse_port=reuse_port, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    background: list[asyncio.Task[None]] = []
    marker = None
    if worker is None:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    else:
        # Ctrl-C reaches the whole process group; only the supervisor acts on it (by SIGTERM).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from authz_service.workers import MULTIPROC_ENV, ready_marker

        marker = ready_marker(os.environ[MULTIPROC_ENV], os.getpid())
        marker.touch()
        background.append(asyncio.ensure_future(_refresh_gauges_forever(service)))
    reloads: set[asyncio.Task[None]] = set()
    if path is not None:

        def on_hup() -> None:
            task = asyncio.ensure_future(_reload_from(service, path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
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
