"""What one decision log line costs a Check: DecisionLog.log_decision (authz_service.decisionlog)
with the writer thread running, as the service runs it (decision lines at info, the default).

On the event loop, a Check only calls log_decision, which builds a small tuple and appends it to
the writer's bounded queue; the writer thread formats the JSON line and writes it. Both costs are
measured as CPU time of their own thread (time.thread_time on the loop, the writer thread's CPU
clock), so other processes on the machine do not blur them:

- call_us: the loop thread's CPU per log_decision call, over batches of 1000 calls;
- writer_us: the writer thread's CPU per line written (format + os.write to /dev/null).

Between batches the loop waits until the writer has written everything (the queue holds 10,000
lines, so nothing is dropped here; `dropped` says so). The target (docs/performance.md) is
call_us <= 5 µs. The writer holds the GIL while it formats, so in the worst case a line takes
call_us + writer_us (total_us) from the loop; that is reported too.

    python bench/micro_decision_log.py --rounds 5     # prints one JSON line
    python bench/micro_decision_log.py --renderers    # the hand-built line against orjson

`--renderers` times the writer thread's formatting alone, in a tight loop on one thread: the
hand-built `_render` against orjson.dumps of the same fields (the timestamp prefix cached per
second in both, as bytes ready for os.write in both), and checks that both give the same JSON
object as the reference (JsonFormatter over decision_fields) for ordinary and hostile strings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from authz_service.decisionlog import (
    _LEVEL_NAMES,
    _MILLIS,
    DecisionItem,
    DecisionLog,
    DecisionWriter,
    _render,
    _trace_fields,
    decision_fields,
)
from authz_service.logs import JsonFormatter
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.redact import redact

BATCH = 1000
BATCHES_PER_ROUND = 50
WRITER_THREAD = "decision-log"  # decisionlog.DecisionWriter's thread name
RENDER_LINES = 200_000


def sample_check() -> tuple[HttpRequest, Decision]:
    """An allow as the service logs it: a request id, a path with a query, a user and an introspector."""
    request = HttpRequest(
        method="GET",
        path="/api/Patient/pt-1?_format=json",
        host="api.example.com",
        scheme="https",
        headers=MappingProxyType({"x-request-id": "9f3c1d2e-5b7a-4c8e-a1f0-6d2b3c4e5f60"}),
        remote_addr="10.0.0.7",
        request_id="9f3c1d2e-5b7a-4c8e-a1f0-6d2b3c4e5f60",
    )
    identity = Identity(
        user_id="2c9a1f4e-7b3d-4e8a-9f10-3b5c7d9e1f20",
        claims=MappingProxyType({"sub": "2c9a1f4e-7b3d-4e8a-9f10-3b5c7d9e1f20"}),
        introspector="keycloak",
        kind="jwt",
    )
    return request, Decision(Outcome.ALLOW, Reason.ALLOWED, identity, introspector=identity.introspector)


def writer_cpu() -> float:
    """CPU seconds the writer thread has used so far."""
    for thread in threading.enumerate():
        if thread.name == WRITER_THREAD and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    raise RuntimeError("the decision log writer thread is not running")


async def one_round(decisions: DecisionLog, request: HttpRequest, decision: Decision) -> tuple[float, float, int]:
    """(loop µs per call, writer µs per line, lines) over BATCHES_PER_ROUND batches."""
    writer = decisions.writer
    assert writer is not None
    log_decision = decisions.log_decision
    loop_cpu = 0.0
    lines_before, writer_before = writer.written, writer_cpu()
    calls = 0
    for _ in range(BATCHES_PER_ROUND):
        started = time.thread_time()
        for _ in range(BATCH):
            log_decision(request, decision, 0.000123, logging.INFO, "grpc")
        loop_cpu += time.thread_time() - started
        calls += BATCH
        target = lines_before + calls
        deadline = time.monotonic() + 10
        # The writer thread cannot wake the loop (it has no handle on it): poll until it has caught up.
        while writer.written + writer.dropped < target and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    lines = writer.written - lines_before
    return 1e6 * loop_cpu / calls, 1e6 * (writer_cpu() - writer_before) / max(1, lines), lines


async def measure(rounds: int) -> dict[str, Any]:
    request, decision = sample_check()
    devnull = os.open(os.devnull, os.O_WRONLY)
    decisions = DecisionLog.to_fd(devnull, logging.INFO)
    try:
        await one_round(decisions, request, decision)  # warm-up: caches, the writer's timestamp prefix
        results = [await one_round(decisions, request, decision) for _ in range(rounds)]
        writer = decisions.writer
        assert writer is not None
        written, dropped = writer.written, writer.dropped
    finally:
        decisions.stop()
        os.close(devnull)
    call_us = statistics.median(r[0] for r in results)
    writer_us = statistics.median(r[1] for r in results)
    return {
        "call_us": round(call_us, 3),
        "writer_us": round(writer_us, 3),
        "total_us": round(call_us + writer_us, 3),
        "rounds": rounds,
        "calls_per_round": BATCH * BATCHES_PER_ROUND,
        "call_us_rounds": [round(r[0], 3) for r in results],
        "writer_us_rounds": [round(r[1], 3) for r in results],
        "lines_written": written,
        "dropped": dropped,
    }


class _OrjsonLine:
    """The decision line as orjson would write it from a dict (what `_render` builds by hand)."""

    def __init__(self) -> None:
        import orjson  # the bench group's; the service does not depend on it

        self._dumps = orjson.dumps
        self._second = -1
        self._prefix = ""

    def __call__(
        self,
        created: float,
        level: int,
        request_id: str,
        method: str,
        path: str,
        outcome: Outcome,
        reason: Reason,
        introspector: str | None,
        identity: Identity | None,
        policy: str | None,
        seconds: float,
        protocol: str,
        dry_run: tuple[tuple[str, str], ...] = (),
        traceparent: str | None = None,
    ) -> bytes:
        second = int(created)
        if self._second != second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        user = identity.user_id if identity else None
        line: bytes = self._dumps(
            {
                "ts": self._prefix + _MILLIS[int((created - second) * 1000)],
                "level": _LEVEL_NAMES.get(level, "info"),
                "logger": "authz_service.decision",
                "msg": "decision",
                "request_id": redact.identifier(request_id),
                "decision": outcome._value_,
                "reason": reason.label,
                "introspector": introspector,
                "user_id": redact.user_id(user) if user is not None else None,
                "method": redact.method(method),
                "path": redact.path(path),
                "latency_ms": round(seconds * 1000, 3),
                "protocol": protocol,
                "policy": policy,
                **({"dry_run": [{"policy": p, "would": w} for p, w in dry_run]} if dry_run else {}),
                **_trace_fields(traceparent),
            }
        )
        return line


def _hostile_items() -> list[tuple[DecisionItem, str]]:
    """(queued line, the reference line JsonFormatter writes) for strings a client controls."""
    cases = [
        ("req-1", "/a", "alice", "GET"),
        ('"quoted" \\ id', '/p"a\\th?q=1', 'u"\\\n\t\x00', 'PO"ST'),
        ("é✓\u2028", "/é/✓\U0001f600", "ü\u2029", "DELETE"),
        ("", "", "", ""),
        ("req-3", "/lone/\udc80", "u\ud800", "GET"),  # surrogates: header bytes decoded with surrogateescape
    ]
    items = []
    for request_id, path, user_id, method in cases:
        request = HttpRequest(method=method, path=path, request_id=request_id)
        decision = Decision(
            Outcome.ALLOW, Reason.ALLOWED, Identity(user_id, {}, "idp", "jwt"), policy="p-1", introspector="idp"
        )
        writer = DecisionWriter(1, logging.INFO)  # not started: the line stays queued
        writer.submit(1_800_000_000.123, logging.INFO, request, decision, 0.0000123, "grpc")
        record = logging.LogRecord("authz_service.decision", logging.INFO, "", 0, "decision", (), None)
        record.created = 1_800_000_000.123
        record.fields = decision_fields(request, decision, 0.0000123, "grpc")
        items.append((writer._queue[0], JsonFormatter().format(record)))
    return items


def _same_object(line: bytes, reference: str) -> bool:
    # Compared as JSON objects, keys in order (a consumer reads objects; the whitespace differs),
    # the reference encoded as the writer encodes every line (a lone surrogate becomes "?").
    try:
        return list(json.loads(line).items()) == list(json.loads(reference.encode("utf-8", "replace")).items())
    except (ValueError, UnicodeDecodeError):
        return False


def renderers() -> dict[str, Any]:
    """µs per line for each renderer (median of 5 runs), and whether each agrees with the reference."""
    request, decision = sample_check()
    writer = DecisionWriter(1, logging.INFO)  # not started: only its queue is used
    writer.submit(time.time(), logging.INFO, request, decision, 0.000123, "grpc")
    item = writer._queue[0]
    orjson_line = _OrjsonLine()

    def hand(*fields: Any) -> bytes:
        return _render(*fields).encode("utf-8", "replace")  # as DecisionWriter._write encodes it

    result: dict[str, Any] = {"lines_per_run": RENDER_LINES}
    for name, render in (("hand_built", hand), ("orjson", orjson_line)):
        runs = []
        for _ in range(5):
            started = time.thread_time()
            for _ in range(RENDER_LINES):
                render(*item)
            runs.append(1e6 * (time.thread_time() - started) / RENDER_LINES)
        result[f"{name}_us"] = round(statistics.median(runs), 3)
        agrees = []
        for queued, reference in _hostile_items():
            try:
                agrees.append(_same_object(render(*queued), reference))
            except TypeError:  # orjson refuses a str with a lone surrogate
                agrees.append(False)
        result[f"{name}_correct"] = all(agrees)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--renderers", action="store_true", help="compare the hand-built line with orjson")
    args = parser.parse_args()
    if args.renderers:
        print(json.dumps(renderers()), flush=True)
        return 0
    try:
        from authz_service.loop import run  # the loop the service runs on (uvloop when installed)
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(measure(args.rounds))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
