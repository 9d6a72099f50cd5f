"""Hostile HTTP-mode requests, byte for byte on a socket, through each of HTTP mode's servers
(granian and aiohttp): every one carries a token that allows the request once read normally, and
none may be allowed. They are denied (our answer), or refused by the server's parser before any
check (its own 400 or 431, or a closed connection); the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService, jwks_introspector

POLICY = {"id": "admin-x", "engine": "matcho", "matcho": {"uri": "/admin/x", "jwt": {"sub": "present?"}}}
LINE = "GET /ext_authz/admin/x HTTP/1.1"
# What a server reads leniently, as the same request (so the token rightly allows it): aiohttp's
# parser takes `GET  /x` for `GET /x` (RFC 9112 3: a recipient SHOULD answer 400). granian: nothing.
LENIENT = {"aiohttp": {"two spaces in the request line"}, "granian": set()}


def hostile(token: str) -> dict[str, list[bytes]]:
    """name -> the request's head lines (Connection: close and the blank line are added)."""
    auth = f"Authorization: Bearer {token}".encode()
    plain = [b"Host: authz.local", auth]
    line = LINE.encode()
    return {
        "oversized header": [line, *plain, b"X-Big: " + b"b" * 9000],
        "oversized head": [line, *plain, b"X-Big: " + b"b" * 600_000],
        "oversized target": [b"GET /ext_authz/admin/x?" + b"q" * 9000 + b" HTTP/1.1", *plain],
        "too many headers": [line, *plain, *(f"X-H{i}: v".encode() for i in range(200))],
        "junk after the version": [line + b" junk", *plain],
        "two spaces in the request line": [line.replace(b" /", b"  /"), *plain],
        "a tab for a space": [line.replace(b" HTTP", b"\tHTTP"), *plain],
        "unknown HTTP version": [line.replace(b"1.1", b"9.9"), *plain],
        "no method": [line[4:], *plain],
        "a space in the target": [line.replace(b"admin", b"adm in"), *plain],
        "NUL in the method": [b"G\x00" + line[1:], *plain],
        "space before the colon": [line, b"Host: authz.local", f"Authorization : Bearer {token}".encode()],
        "NUL in the token": [line, b"Host: authz.local", auth + b"\x00"],
        "CR in a value": [line, *plain, b"X-A: a\rb"],
        "two different Content-Lengths": [line, *plain, b"Content-Length: 0", b"Content-Length: 2"],
        "a header line without a colon": [line, *plain, b"NoColonHere"],
    }


async def status_of(port: int, lines: list[bytes]) -> int | None:
    """The status the server answers `lines` with (and Connection: close), None when it only closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # (two bytes of body: as much as the longer Content-Length says, for the request that has two)
        body = b"xx" if any(line.startswith(b"Content-Length") for line in lines) else b""
        writer.write(b"\r\n".join([*lines, b"Connection: close", b"", b""]) + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()
    if not data:
        return None
    return int(data.split(b" ", 2)[1])


async def test_no_hostile_request_is_allowed(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str
) -> None:
    harness = await start_service(
        {
            "server": {
                "grpc_address": "127.0.0.1:0",
                "admin_address": None,
                "http_address": "127.0.0.1:0",
                "http_engine": http_engine,
            },
            "introspectors": [jwks_introspector(idp)],
            "policies": [POLICY],
        }
    )
    assert harness.service.http is not None
    assert harness.service.http.port is not None
    port = harness.service.http.port
    token = idp.mint({"sub": "alice"})
    answers = {name: await status_of(port, lines) for name, lines in hostile(token).items()}
    allowed = {name for name, status in answers.items() if status is not None and status < 300}
    assert allowed == LENIENT[http_engine]
    assert allows(harness.service.metrics.registry) == len(allowed)
    # The token allows the same request read normally, and the listener still serves.
    assert (
        await status_of(port, [LINE.encode(), b"Host: authz.local", f"Authorization: Bearer {token}".encode()]) == 200
    )
    assert allows(harness.service.metrics.registry) == len(allowed) + 1


def allows(registry: CollectorRegistry) -> float:
    """HTTP-mode checks allowed so far."""
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "authz_checks_total"
        and sample.labels.get("decision") == "allow"
        and sample.labels.get("protocol") == "http"
    )
