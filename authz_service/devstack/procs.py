"""Child processes of the dev stack: started with their logs in files, stopped cleanly, never orphaned."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

STOP_TIMEOUT: Final = 10.0  # per child, before SIGKILL
_POLL: Final = 0.05
_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>


class StartError(Exception):
    """A child could not start or get ready; carries the log that explains it."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when we die, even by SIGKILL (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Looked up here, in the parent: the child between fork and exec should do as little as possible.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        # The parent may have died before prctl ran; then no signal will ever come.
        if os.getppid() != parent:
            os.kill(os.getpid(), sigterm)

    return preexec


@dataclass
class Child:
    """One child process and the log that explains it."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """Still running."""
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The end of its log, for messages."""
        return tail(self.log, lines)


def spawn(
    name: str,
    argv: list[str],
    log: Path,
    *,
    stdout_log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Child:
    """Start a child with its output in log files (stdout to stdout_log when given); it dies with us."""
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb"))
        stdout = files.enter_context(stdout_log.open("wb")) if stdout_log is not None else stderr
        try:
            # PR_SET_PDEATHSIG fires when the *thread* that forked exits: spawn only from the main thread.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                preexec_fn=die_with_parent(),
            )
        except OSError as err:
            raise StartError(f"cannot start {name} ({argv[0]}): {err}") from err
    return Child(name, process, log)


async def terminate(child: Child, timeout: float = STOP_TIMEOUT) -> str | None:
    """SIGTERM, wait without blocking the loop, SIGKILL after timeout; a note if it went badly."""
    process = child.process
    if process.poll() is None:
        process.terminate()
    deadline = time.monotonic() + timeout
    # Popen's exit is not awaitable: poll it without blocking the loop.
    while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_POLL)
    if process.poll() is None:
        process.kill()
        process.wait()
        return f"{child.name} did not stop within {timeout:g} s and was killed"
    # -SIGINT/-SIGTERM: a terminal's Ctrl-C reached the child directly; that is a normal stop.
    if process.returncode not in (0, -signal.SIGINT, -signal.SIGTERM):
        return f"{child.name} exited with code {process.returncode} (see {child.log})"
    return None


def tail(path: Path, lines: int = 20) -> str:
    """The end of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no log)"
    last = text.splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in last) if last else "    (log is empty)"


async def wait_until(child: Child, what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll check until true; StartError if the child exits first or the timeout passes.

    `check` may raise aiohttp's errors, OSError or TimeoutError while the child is not listening
    yet; they count as "not yet".
    """
    deadline = time.monotonic() + timeout
    while True:
        if child.process.poll() is not None:
            raise StartError(f"{child.name} exited during start-up (code {child.process.returncode})", child.log)
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise StartError(f"{child.name}: {what} not reached within {timeout:g} s", child.log)
        await asyncio.sleep(_POLL)
