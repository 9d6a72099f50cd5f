"""A small aiohttp server with a lifecycle: the base of the demo IdP and the echo upstream."""

from __future__ import annotations

from types import TracebackType
from typing import Final, TypeVar

from aiohttp import web

# In-flight answers take microseconds; keep stop() quick.
SHUTDOWN_TIMEOUT: Final = 0.1

_Self = TypeVar("_Self", bound="LocalHttpServer")


class LocalHttpServer:
    """Serves make_app() on host:port; a restart binds the port it had before."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Remember where to listen; nothing listens until start()."""
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    def make_app(self) -> web.Application:
        """The application to serve."""
        raise NotImplementedError

    async def start(self) -> None:
        """Bind host:port (0 picks an ephemeral port, which later restarts reuse) and serve."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} already running")
        port = self._bound_port if self._bound_port is not None else self._port
        # handler_cancellation: a client giving up on a slow answer also ends the handler.
        runner = web.AppRunner(
            self.make_app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT, handler_cancellation=True
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and drop open connections; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self: _Self) -> _Self:
        """Start and return self."""
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop."""
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (valid after start)."""
        if self._bound_port is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self._bound_port

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT (valid after start)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"
