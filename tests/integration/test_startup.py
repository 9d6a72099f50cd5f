"""Start-up names every listener in one log line (the busy-port case is in tests/unit/test_cli.py)."""

from __future__ import annotations

import json

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import Spawn, free_port, jwks_introspector


async def test_the_serving_line_names_every_listener(spawn: Spawn, idp: DevIdentityProvider) -> None:
    http, admin = free_port(), free_port()
    spawned = await spawn(
        {"introspectors": [jwks_introspector(idp)]},
        {"http_address": f"127.0.0.1:{http}", "admin_address": f"127.0.0.1:{admin}"},
    )
    lines = [json.loads(line) for line in spawned.log.read_text().splitlines() if line.startswith("{")]
    [serving] = [line for line in lines if line.get("msg") == "serving"]
    assert serving["listeners"] == {
        "grpc": [f"127.0.0.1:{spawned.port}"],
        "http": [f"127.0.0.1:{http}"],
        "admin": [f"http://127.0.0.1:{admin}"],
    }
