"""`authz-service demo` as a user runs it: the real command, its printed curl commands, Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from authz_service.devstack.demo import Ports

READY_TIMEOUT = 40.0  # first line to "Press Ctrl-C": Python start-up, IdP keys, service, Envoy
EXIT_TIMEOUT = 20.0
READY_LINE = "Press Ctrl-C to stop everything."
PROMISED = [200, 401, 401, 403, 200, 200, 201, 200, 302, 200]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the demo's Envoy binary is Linux-only"),
]


def bindable(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def demo_ports(offset: int) -> list[int]:
    return list(dataclasses.astuple(Ports().shifted(offset)))


def free_offset() -> int:
    """A port offset whose demo ports are all free: never clashes with a developer's demo on 8080 & co.
    Shifted ports stay below 32768, Linux's ephemeral range, where other tests' port-0 servers live."""
    for _ in range(200):
        offset = random.randrange(10_000, 32_768 - max(demo_ports(0)))
        if all(bindable(port) for port in demo_ports(offset)):
            return offset
    pytest.fail("no free port offset for the demo")


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after up to timeout seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Polled: these are the demo's children, not ours, so nothing can notify us of their exit.
    while any(alive(pid) for pid in pids) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


@dataclass
class Demo:
    """A running `python -m authz_service demo` and what it printed."""

    process: asyncio.subprocess.Process
    stderr: Path
    offset: int
    lines: list[str] = dataclasses.field(default_factory=list)

    async def read_until(self, last: str, timeout: float = READY_TIMEOUT) -> list[str]:
        """Stdout lines up to and including `last`; fails on EOF or timeout."""
        stdout = self.process.stdout
        assert stdout is not None

        async def read() -> None:
            while not self.lines or self.lines[-1] != last:
                raw = await stdout.readline()
                if not raw:
                    pytest.fail(f"demo exited before {last!r}:\n{self.output()}")
                self.lines.append(raw.decode().rstrip("\n"))

        try:
            await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            pytest.fail(f"demo did not print {last!r} within {timeout:g} s:\n{self.output()}")
        return self.lines

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + self.stderr.read_text(errors="replace")

    def printed_pids(self) -> list[int]:
        """The children's pids from the `pids: <service> <envoy>` line, if printed yet."""
        for line in self.lines:
            match = re.match(r"\s*pids: (\d+) (\d+)", line)
            if match:
                return [int(match[1]), int(match[2])]
        return []

    def pids(self) -> list[int]:
        """The children's pids; fails when the demo did not print them."""
        return self.printed_pids() or pytest.fail(f"no pids line:\n{self.output()}")

    async def exit_code(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Read the rest of stdout and wait for the exit."""
        assert self.process.stdout is not None
        try:
            rest = await asyncio.wait_for(self.process.stdout.read(), timeout)
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            pytest.fail(f"demo did not exit within {timeout:g} s:\n{self.output()}")
        self.lines.extend(rest.decode().splitlines())
        return code


StartDemo = Callable[..., Awaitable[Demo]]


@pytest.fixture
async def start_demo(tmp_path: Path) -> AsyncIterator[StartDemo]:
    """Start `python -m authz_service demo` on free ports; whatever is left is killed after the test."""
    started: list[Demo] = []

    async def start(offset: int | None = None) -> Demo:
        offset = free_offset() if offset is None else offset
        stderr = tmp_path / f"demo-{len(started)}.stderr"
        with stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "authz_service",
                "demo",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                # TMPDIR: the demo's log directory lands in this test's tmp_path.
                env={
                    **os.environ,
                    "AUTHZ_DEMO_PORT_OFFSET": str(offset),
                    "TMPDIR": str(tmp_path),
                    "PYTHONUNBUFFERED": "1",
                },
            )
        demo = Demo(process, stderr, offset)
        started.append(demo)
        return demo

    yield start
    # A failed test must not leave a stack running: the demo, then any child it printed.
    for demo in started:
        if demo.process.returncode is None:
            demo.process.kill()
            await demo.process.wait()
        for pid in demo.printed_pids():
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class Curl:
    """One printed curl command and the status its comment promises."""

    promised: int
    url: str
    headers: dict[str, str]
    method: str = "GET"
    body: str | None = None


def parse_examples(lines: list[str]) -> list[Curl]:
    """Each `# N. ... -> STATUS...` comment with the `curl ...` line that follows it."""
    examples = []
    for comment, command in itertools.pairwise(lines):
        if not command.startswith("curl "):
            continue
        promise = re.match(r"# \d+\. .* -> (\d{3})\b", comment)
        assert promise, f"curl line without a '-> STATUS' comment above it: {comment!r}"
        url, headers, method, body = "", {}, "GET", None
        words = iter(shlex.split(command)[1:])
        for word in words:
            if word == "-H":
                name, _, value = next(words).partition(":")
                headers[name.strip()] = value.strip()
            elif word == "-X":
                method = next(words)
            elif word == "--data-binary":
                body = next(words)
            elif word.startswith("-"):
                assert word in {"-i", "-s", "-S", "-sS"}, f"unexpected curl option {word!r}"
            else:
                url = word
        examples.append(Curl(int(promise[1]), url, headers, method, body))
    return examples


async def test_demo_prints_working_curl_commands_and_stops_cleanly_on_ctrl_c(start_demo: StartDemo) -> None:
    demo = await start_demo()
    lines = await demo.read_until(READY_LINE)
    pids = demo.pids()
    assert all(alive(pid) for pid in pids)
    ports = Ports().shifted(demo.offset)

    examples = parse_examples(lines)
    assert [example.promised for example in examples] == PROMISED, demo.output()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        answers = []
        locations: list[str | None] = []
        # In the printed order: #7 changes a policy through the resource API, #8 sees the change.
        for example in examples:
            port = ports.admin if example.method == "PUT" else ports.listener
            assert example.url.startswith(f"http://127.0.0.1:{port}/"), example
            async with session.request(
                example.method, example.url, headers=example.headers, data=example.body, allow_redirects=False
            ) as response:
                answers.append((response.status, response.headers.get("www-authenticate"), await response.text()))
                locations.append(response.headers.get("location"))
    assert [status for status, _, _ in answers] == PROMISED, answers
    # #8 is #4's request again: forbidden before the PUT, allowed by the new policy after it.
    assert (examples[7].url, examples[7].headers) == (examples[3].url, examples[3].headers)
    assert json.loads(answers[6][2])["id"] == "readers-see-admin"

    # The valid JWT reached the echo upstream with exactly one, service-set, x-user-id.
    echoed = json.loads(answers[0][2])
    assert echoed["headers"]["x-user-id"] == ["alice"]
    # Denials as the SPEC promises; the opaque token resolved to its user; the public path is anonymous.
    assert answers[1][1] == 'Bearer realm="authz-service"'
    assert 'error="invalid_token"' in (answers[2][1] or "")
    assert json.loads(answers[4][2])["headers"]["x-user-id"] == ["carol"]
    assert "x-user-id" not in json.loads(answers[5][2])["headers"]
    # #9: a browser without a token is sent to the login page with its URL; #2 (no Accept) kept its 401.
    assert examples[8].headers == {"Accept": "text/html"}
    assert locations[8] == f"http://127.0.0.1:{ports.idp}/login?rd=" + quote(examples[8].url, safe="")
    # #10: the upstream got the identity token; the printed pipeline verifies it against the
    # admin listener's JWKS (run here with this Python, the pipeline's curl replaced by #10's answer).
    (token,) = json.loads(answers[9][2])["headers"]["x-identity-token"]
    verify = lines[lines.index(next(line for line in lines if line.startswith("# 10. "))) + 3]
    assert verify.startswith(f"#    curl -s {examples[9].url} ")
    script = shlex.split(verify.partition(" | ")[2])
    assert script[:2] == ["python", "-c"]
    verified = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script[2]],
        input=answers[9][2],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr
    assert "'sub': 'carol'" in verified.stdout
    assert "'email': 'carol@example.com'" in verified.stdout
    assert "'policy': 'signed-in'" in verified.stdout
    assert token.count(".") == 2

    demo.process.send_signal(signal.SIGINT)
    assert await demo.exit_code() == 0, demo.output()
    assert await wait_gone(pids, 1.0) == [], f"children survived the demo:\n{demo.output()}"
    assert all(bindable(port) for port in demo_ports(demo.offset)), "a demo port is still held"
    assert "Traceback" not in demo.output()
    assert demo.lines[-1].startswith("stopped; logs kept in ")


async def test_children_die_when_the_demo_is_killed_hard(start_demo: StartDemo) -> None:
    demo = await start_demo()
    await demo.read_until(READY_LINE)
    pids = demo.pids()
    demo.process.kill()  # no chance to clean up: only PR_SET_PDEATHSIG stops the children
    await demo.process.wait()
    assert await wait_gone(pids, 10.0) == [], "children outlived a SIGKILLed demo"


async def test_a_taken_port_is_named_and_nothing_starts(start_demo: StartDemo) -> None:
    offset = free_offset()
    grpc_port = Ports().shifted(offset).grpc
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", grpc_port))
        squatter.listen()
        demo = await start_demo(offset)
        code = await demo.exit_code()
    assert code == 1
    stderr = demo.stderr.read_text()
    assert f"{grpc_port} (authz-service gRPC)" in stderr
    assert "AUTHZ_DEMO_PORT_OFFSET" in stderr
    assert "Traceback" not in stderr
    assert demo.lines == []
