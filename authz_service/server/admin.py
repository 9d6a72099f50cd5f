"""The admin HTTP server (aiohttp): /healthz, /readyz, /metrics, and the resource API when enabled."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

if TYPE_CHECKING:
    from authz_service.server.api import ResourceApi


class AdminServer:
    """Liveness, readiness and Prometheus metrics on `server.admin_address`; with `api`, the
    resource API on every other path (without it, those paths are 404)."""

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        collect: Callable[[], None] = lambda: None,
        *,
        api: ResourceApi | None = None,
        details: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._registry = registry
        self._ready = ready
        self._collect = collect  # refreshes gauges that are read, not counted, just before a scrape
        self._api = api
        self._details = details  # more for /readyz to say (the resource store's state)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        # aiohttp's own cap on request.read(); the API streams and caps bodies itself (413).
        app = web.Application(client_max_size=self._api.max_body if self._api is not None else 1024**2)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        if self._api is not None:
            self._api.register(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_port=True)
        await site.start()
        # The real port when 0 was asked for: the runner knows the addresses it bound.
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        details = dict(self._details()) if self._details is not None else {}
        if self._ready():
            # Still 200 when the resource store is unreachable: every replica would go unready at
            # once on a Redis outage. The body says so; the process decides with what it has.
            return web.json_response({"status": "ready", **details})
        return web.json_response({"status": "not ready", **details}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        self._collect()
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
