"""The admin HTTP server (aiohttp): /healthz, /readyz, /metrics, the identity token's
/.well-known/jwks.json and /.well-known/openid-configuration, and the resource API when enabled.

With `server.admin_tls` it serves HTTPS only (the resource API's bearer tokens never cross the
network in clear text); without it, plain HTTP, and a start-up warning when the API is on and the
address is not loopback (config validation words it; `serve` logs it).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from authz_service.config.model import Listen, TlsConfig
from authz_service.errors import bind_failure, host_port
from authz_service.server.runner import readiness

if TYPE_CHECKING:
    from authz_service.server.api import ResourceApi


class AdminServer:
    """Liveness, readiness and Prometheus metrics on `server.admin_address`; with `api`, the
    resource API on every other path (without it, those paths are 404)."""

    def __init__(
        self,
        listen: Listen,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        collect: Callable[[], None] = lambda: None,
        *,
        api: ResourceApi | None = None,
        details: Callable[[], Mapping[str, Any]] | None = None,
        tls: TlsConfig | None = None,
        well_known: Callable[[], Mapping[str, bytes]] = dict,
    ) -> None:
        self._host = listen.host
        self._port = listen.port
        self._registry = registry
        self._ready = ready
        self._collect = collect  # refreshes gauges that are read, not counted, just before a scrape
        self._api = api
        self._details = details  # more for /readyz to say (each introspector's keys, the resource store)
        self._runner: web.AppRunner | None = None
        self._tls = tls
        # The current engine's /.well-known/ documents (the identity token's JWKS and discovery
        # document), by path; read per request so a reload that adds or rotates keys shows at once.
        self._well_known = well_known
        self.port: int | None = None

    @property
    def address(self) -> str:
        """Where it listens (the bound port once started)."""
        return host_port(self._host, self.port or self._port)

    @property
    def scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    async def start(self) -> int:
        # aiohttp's own cap on request.read(); the API streams and caps bodies itself (413).
        app = web.Application(client_max_size=self._api.max_body if self._api is not None else 1024**2)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        # Unauthenticated: public keys and where they are. 404 when no identity token is configured.
        app.router.add_get("/.well-known/jwks.json", self._document)
        app.router.add_get("/.well-known/openid-configuration", self._document)
        if self._api is not None:
            self._api.register(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        context = server_context(self._tls) if self._tls is not None else None
        site = web.TCPSite(self._runner, self._host, self._port, reuse_port=True, ssl_context=context)
        try:
            await site.start()
        except OSError as err:
            await self.stop()
            raise bind_failure(host_port(self._host, self._port), err) from err
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
        # Still 200 when the resource store is unreachable: every replica would go unready at
        # once on a Redis outage. The body says so; the process decides with what it has.
        status, body = readiness(self._ready, self._details or dict)
        return web.json_response(body, status=status)

    async def _document(self, request: web.Request) -> web.Response:
        body = self._well_known().get(request.path)
        if body is None:
            return web.json_response({"error": "not_found"}, status=404)
        # Verifiers cache the key set; a rotation publishes the next key before it signs (docs/responses.md).
        return web.Response(
            body=body, content_type="application/json", headers={"cache-control": "public, max-age=300"}
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        self._collect()
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """TLS 1.2 and up with Python's default server ciphers, from the files config validation read
    (`server.admin_tls: {cert, key}`: the same paths, so a certificate renewed in place is picked up
    at the next restart)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = tls.files[0], tls.files[1]
    context.load_cert_chain(cert, key)
    return context
