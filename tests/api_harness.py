"""A real service started from a config file with a resource store, as `serve` starts one, plus a
client for its resource API (aiohttp) and its gRPC Check."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml

from authz_service.server.service import AuthzService
from tests.harness import Answer, AuthorizationClient, check_request

API_TOKEN = "test-api-token-0123456789abcdef"
LONG_SECRET = "0123456789abcdef0123456789abcdef"


@dataclass
class Reply:
    """One answer of the resource API."""

    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def diagnostics(self) -> list[str]:
        assert isinstance(self.body, dict), self.body
        assert self.body.get("resourceType") == "OperationOutcome", self.body
        return [issue["diagnostics"] for issue in self.body["issue"]]


def config_with_api(store: Mapping[str, Any] | None, token: str | None = API_TOKEN, **sections: Any) -> dict[str, Any]:
    """A config on ephemeral loopback ports, with `api: {token, store}`."""
    api: dict[str, Any] = {}
    if token is not None:
        api["token"] = token
    if store is not None:
        api["store"] = dict(store)
    config: dict[str, Any] = {
        "server": {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_delay": 0},
        **sections,
    }
    if api:
        config["api"] = api
    return config


class ApiService:
    """A started service (AuthzService.from_file), its admin URL and a Check stub."""

    def __init__(self, service: AuthzService, path: Path, token: str = API_TOKEN) -> None:
        self.service = service
        self.path = path
        self.token = token
        assert service.admin is not None
        assert service.admin.port is not None
        self.url = f"http://127.0.0.1:{service.admin.port}"
        assert service.port is not None
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        self.stub = AuthorizationClient(self.channel)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def request(
        self,
        method: str,
        path: str,
        body: str | bytes | Any = None,
        *,
        content_type: str = "text/yaml",
        token: str | None = "default",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """`method path` with the API token (unless token=None), a text body as is, anything else as JSON."""
        sent: dict[str, str] = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        data: bytes | None = None
        if isinstance(body, str | bytes):
            data = body.encode() if isinstance(body, str) else body
            sent.setdefault("Content-Type", content_type)
        elif body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.url + path, data=data, headers=sent) as response:
            text = await response.text()
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = text
            return Reply(response.status, parsed, dict(response.headers))

    async def check(self, path: str = "/", **kwargs: Any) -> Answer:
        return Answer.of(await self.stub.Check(check_request(path, **kwargs), timeout=10))

    async def close(self) -> None:
        await self.session.close()
        await self.channel.close()
        await self.service.stop(0)


async def start_api_service(path: Path, config: Mapping[str, Any] | None = None) -> ApiService:
    """Write `config` to `path` (unless None: use the file as it is), start a service from it."""
    if config is not None:
        await asyncio.to_thread(path.write_text, yaml.safe_dump(dict(config), sort_keys=False))
    service = await AuthzService.from_file(str(path))
    try:
        await service.start()
    except BaseException:
        await service.close_store()
        raise
    return ApiService(service, path)
