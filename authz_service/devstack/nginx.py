"""A real nginx (Debian's `nginx` package) running the shipped deploy/nginx/nginx.conf on loopback.

Like the Envoy launcher, it rewrites only the config's addresses: its listener and the servers
of its `authz_service` and `application` upstreams, so what runs is the shipped file. nginx runs
in the foreground as a child that dies with us, with its pid file, error log and temporary files
in a work directory (so it needs no root and leaves nothing behind).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

from authz_service.devstack.procs import Child, spawn, terminate, wait_until

HOST: Final = "127.0.0.1"
START_TIMEOUT: Final = 10.0
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxNotInstalled(RuntimeError):
    """No nginx binary: install Debian's `nginx` package (./dev test does)."""


def nginx_binary() -> str:
    """The nginx binary on PATH (or in /usr/sbin, where Debian puts it)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise NginxNotInstalled("nginx is not installed (Debian: apt-get install nginx)")
    return found


def on_loopback(config: str, *, listener: int, upstreams: dict[str, int], workdir: Path) -> str:
    """The config with its listener and the named upstreams' servers on 127.0.0.1 ports, and its
    temporary files under workdir."""
    text, count = re.subn(r"listen\s+[\d.]+:\d+;", f"listen {HOST}:{listener};", config)
    if count != 1:
        raise ValueError("the nginx config no longer has the one `listen` line this launcher rewrites")
    for name, port in upstreams.items():
        pattern = rf"(upstream\s+{re.escape(name)}\s*\{{[^}}]*?server\s+)[\d.]+:\d+;"
        text, count = re.subn(pattern, rf"\g<1>{HOST}:{port};", text)
        if count != 1:
            raise ValueError(f"the nginx config has no `upstream {name}` with one server line")
    temps = "".join(f"    {kind}_temp_path {workdir / kind};\n" for kind in _TEMP_PATHS)
    return text.replace("http {\n", "http {\n" + temps, 1)


@dataclass
class Nginx:
    """A running nginx: its child process and where it listens."""

    child: Child
    listener: int
    error_log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.listener}"

    @classmethod
    def start(cls, config: str, listener: int, workdir: Path) -> Nginx:
        """Write the config and run nginx on it in the foreground."""
        path = workdir / "nginx.conf"
        path.write_text(config)
        error_log = workdir / "nginx-error.log"
        globals_ = f"daemon off; master_process on; pid {workdir / 'nginx.pid'}; error_log {error_log} warn;"
        argv = [nginx_binary(), "-p", str(workdir), "-c", str(path), "-g", globals_]
        child = spawn("nginx", argv, workdir / "nginx.log")
        return cls(child, listener, error_log)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = START_TIMEOUT) -> None:
        """Until nginx answers HTTP on its listener (any status: the app behind may not be up)."""

        async def answering() -> bool:
            async with session.get(self.url + "/", timeout=aiohttp.ClientTimeout(total=1)) as response:
                return response.status > 0

        await wait_until(self.child, "an HTTP answer", answering, timeout)

    async def stop(self) -> str | None:
        """SIGTERM (nginx's fast shutdown), SIGKILL if it lingers; a note if it went badly."""
        return await terminate(self.child)
