"""The decision log: one JSON line per Check, written off the event loop, never with credentials.

A `DecisionLog` is created where a process starts serving and handed to whatever runs checks;
its bound methods (`log_decision`, `log_internal_error`, `log_policy_timeout`) are what the
runner calls. With a `DecisionWriter` (the service's processes) lines are formatted and written
by a thread; without one (tools, in-process tests) they go through stdlib logging, where pytest's
caplog sees them. Every request value passes through `redact`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
import traceback
from collections import deque
from typing import Any

from authz_service.errors import PolicyTimeout
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.redact import redact
from authz_service.tracing import trace_ids

log = logging.getLogger("authz_service")
decision_log = logging.getLogger("authz_service.decision")

# Adding a field to the decision line (dry_run, ...) takes three edits, all here (trace_id and span_id
# are such fields: present only when the request carries a valid traceparent):
#   1. `decision_fields`: the field as JsonFormatter writes it (the reference the tests hold the
#      writer to: tests/integration/test_decision_log.py compares the two for hostile strings);
#   2. `DecisionItem` and `DecisionWriter.submit`: append the raw value (a str, a bool or None, no
#      request object: see DecisionItem);
#   3. `_render`: a parameter in the same position, a string written through `_quote` (`"null"` for
#      None, `"true"`/`"false"` for a bool), in the key order of (1).
# Optional fields go last, so every consumer's existing keys keep their place.


def decision_fields(request: HttpRequest, decision: Decision, seconds: float, protocol: str) -> dict[str, Any]:
    """What a decision line says, every request value through `redact`."""
    identity = decision.identity
    return {
        "request_id": redact.identifier(request.request_id),
        "decision": decision.outcome.value,
        "reason": decision.reason.label,
        "introspector": decision.introspector,
        "user_id": redact.user_id(identity.user_id) if identity else None,
        "method": redact.method(request.method),
        "path": redact.path(request.path),
        "latency_ms": round(seconds * 1000, 3),
        "protocol": protocol,
        "policy": decision.policy,
        # Only when dry-run policies were asked: lines of configs without them stay as they were.
        **({"dry_run": [{"policy": p, "would": w} for p, w in decision.dry_run]} if decision.dry_run else {}),
        **_trace_fields(request.headers.get("traceparent")),
    }


def _trace_fields(traceparent: str | None) -> dict[str, str]:
    """`trace_id` and `span_id` of a valid traceparent header (the caller's span: Envoy's, Istio's,
    a client's), none otherwise: a line without trace context keeps exactly its former keys."""
    ids = trace_ids(traceparent) if traceparent is not None else None
    return {} if ids is None else {"trace_id": ids[0], "span_id": ids[1]}


def iso_timestamp(created: float) -> str:
    """`2026-11-29T21:40:01.123Z`, as every log line has it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


# What the loop hands the writer for one line (DecisionWriter.submit): the request's id, method and
# path, not the request (the identity is the cached one). A queued line waits up to ~50 ms for the
# writer's next batch, and a stalled log reader lets 10,000 of them wait: each request held with its
# headers dict and header strings was ~2.7 KB (26.6 MB for a full queue), these are ~350 bytes.
DryRunAnswers = tuple[tuple[str, str], ...]  # Decision.dry_run: (policy id, "allow" | "deny") pairs
# The last item is the request's traceparent header as sent (None without one, or when longer than
# any valid one): the writer thread parses it, so Check pays a dict lookup for it.
DecisionItem = tuple[
    float,
    int,
    str,
    str,
    str,
    Outcome,
    Reason,
    str | None,
    Identity | None,
    str | None,
    float,
    str,
    DryRunAnswers,
    str | None,
]


class DecisionWriter:
    """Decision lines off the event loop: Check hands a small tuple to a bounded queue, a thread
    formats and writes them in batches. A full queue drops the line and counts it; it never blocks,
    so a stalled log reader (a full pipe, a slow collector) slows no check.
    """

    def __init__(self, fd: int, min_level: int, max_queue: int = 10_000, idle: float = 0.05) -> None:
        self._fd = fd
        self._chunk = _chunk_size(fd)
        self.min_level = min_level
        self._queue: deque[DecisionItem] = deque()
        self._max_queue = max_queue
        self._idle = idle
        self.dropped = 0  # read by metrics at scrape time (Metrics.track_decision_log)
        self.written = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)

    def start(self) -> DecisionWriter:
        self._thread.start()
        return self

    def submit(
        self, created: float, level: int, request: HttpRequest, decision: Decision, seconds: float, protocol: str
    ) -> None:
        """On the loop: enqueue what the line says (about 0.3 µs), or drop and count when the writer
        is behind. The request's id, method and path, not the request: see DecisionItem."""
        if len(self._queue) < self._max_queue:
            # `in` first: on gRPC's header map a missed get() costs ~3 times a membership test.
            headers = request.headers
            traceparent = None
            if "traceparent" in headers:
                traceparent = headers["traceparent"]
                if len(traceparent) > _MAX_TRACEPARENT:
                    traceparent = None  # never valid: not worth keeping queued
            self._queue.append(
                (
                    created,
                    level,
                    request.request_id,
                    request.method,
                    request.path,
                    decision.outcome,
                    decision.reason,
                    decision.introspector,
                    decision.identity,
                    decision.policy,
                    seconds,
                    protocol,
                    decision.dry_run,  # a tuple of (policy id, "allow" | "deny") string pairs
                    traceparent,
                )
            )
        else:
            self.dropped += 1

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most `timeout` seconds) and end the thread."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        # One batch, then sleep `idle` even when more lines are waiting: the thread takes the GIL
        # about 100 times a second, not at every moment the loop releases it. Writing as soon as a
        # line arrives made the two threads trade the GIL at every syscall of the loop, and cost
        # gRPC Check 15% of its throughput; batching keeps the writer's share near its own ~4 µs a line.
        queue = self._queue
        while True:
            if queue:
                lines: list[str] = []
                while queue and len(lines) < 1000:
                    lines.append(_render(*queue.popleft()))
                self._write(lines)
                if len(queue) > self._max_queue // 2 or self._stopping.is_set():
                    continue  # behind, or flushing before exit: no pause
            elif self._stopping.is_set():
                return
            time.sleep(self._idle)

    def _write(self, lines: list[str]) -> None:
        # Chunks of whole lines (_chunk_size): each os.write lands in one piece, never interleaved
        # with another thread's log line.
        # The chunk's pieces are joined once: `bytes +=` copies the whole chunk at every line.
        chunk: list[bytes] = []
        size = 0
        limit = self._chunk
        for line in lines:
            data = line.encode("utf-8", "replace") + b"\n"
            if chunk and size + len(data) > limit:
                self._write_all(b"".join(chunk))
                chunk.clear()
                size = 0
            chunk.append(data)
            size += len(data)
        if chunk:
            self._write_all(b"".join(chunk))
        self.written += len(lines)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = os.write(self._fd, view)
            except OSError:
                return  # the reader is gone: nothing to tell it
            view = view[sent:]


_PIPE_BUF = 4096
_FILE_CHUNK = 65536


def _chunk_size(fd: int) -> int:
    """How many bytes one os.write may carry: PIPE_BUF on a pipe or a socket (only that much is
    written in one piece there), 64 KiB on a file or a terminal (one write is one piece). Each
    write releases the GIL and takes it back: at 19k decisions/s, 4 KiB chunks were ~80 GIL
    hand-offs a batch that a file does not need (no change in throughput measurable on the VM's
    noise: docs/performance.md, "HTTP mode on granian, 2026-12-06")."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return _PIPE_BUF
    return _PIPE_BUF if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else _FILE_CHUNK


_MAX_TRACEPARENT = 512  # parse_traceparent's own limit
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}

# The C string encoder json.dumps itself uses (ensure_ascii=False): ~0.1 µs a string.
_quote: Any = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # the timestamp's tail, by milliseconds


class _SecondPrefix:
    """`2026-11-29T21:40:01` for the second being written: strftime once a second, not once a line
    (only the writer thread formats lines, so one per process needs no lock)."""

    second = -1
    text = ""


def _render(
    created: float,
    level: int,
    request_id: str,
    method: str,
    path: str,
    outcome: Outcome,
    reason: Reason,
    introspector_id: str | None,
    identity: Identity | None,
    policy: str | None,
    seconds: float,
    protocol: str,
    dry_run: DryRunAnswers = (),
    traceparent: str | None = None,
) -> str:
    """The JSON line JsonFormatter would write for decision_fields(...), built by hand: the writer
    thread holds the GIL while it formats, so every microsecond here is taken from Check (9 µs with
    a dict and json.dumps, ~2.2 µs like this; orjson from a dict: see docs/performance.md).
    tests/integration/test_decision_log.py checks the two agree."""
    second = int(created)
    prefix = _SecondPrefix
    if prefix.second != second:
        prefix.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        prefix.second = second
    introspector = _quote(introspector_id) if introspector_id is not None else "null"
    user = identity.user_id if identity else None
    return (
        f'{{"ts": "{prefix.text}{_MILLIS[int((created - second) * 1000)]}", '
        f'"level": "{_LEVEL_NAMES.get(level, "info")}", "logger": "authz_service.decision", "msg": "decision", '
        f'"request_id": {_quote(redact.identifier(request_id))}, '
        f'"decision": "{outcome._value_}", "reason": "{reason.label}", '
        f'"introspector": {introspector}, '
        f'"user_id": {_quote(redact.user_id(user)) if user is not None else "null"}, '
        f'"method": {_quote(redact.method(method))}, "path": {_quote(redact.path(path))}, '
        f'"latency_ms": {round(seconds * 1000, 3)!r}, "protocol": {_quote(protocol)}, '
        f'"policy": {_quote(policy) if policy is not None else "null"}'
        f"{_dry_run(dry_run) if dry_run else ''}{_trace_suffix(traceparent)}}}"
    )


def _dry_run(answers: DryRunAnswers) -> str:
    """`, "dry_run": [{"policy": ID, "would": "allow"}, ...]`, as json.dumps writes the list."""
    items = ", ".join(f'{{"policy": {_quote(policy)}, "would": {_quote(would)}}}' for policy, would in answers)
    return f', "dry_run": [{items}]'


def _trace_suffix(traceparent: str | None) -> str:
    """`, "trace_id": ..., "span_id": ...` for a valid traceparent (lower-case hex: nothing to quote)."""
    ids = trace_ids(traceparent) if traceparent is not None else None
    if ids is None:
        return ""
    return f', "trace_id": "{ids[0]}", "span_id": "{ids[1]}"'


class DecisionLog:
    """Where a process's decision lines go: its writer thread, or stdlib logging without one.

    The runner takes the bound methods (`log_decision`, `log_internal_error`, `log_policy_timeout`),
    so nothing that checks requests holds module state, and a test builds its own DecisionLog.
    """

    def __init__(self, writer: DecisionWriter | None = None) -> None:
        self.writer = writer

    @classmethod
    def to_fd(cls, fd: int, min_level: int) -> DecisionLog:
        """Lines to `fd` (the process's stderr) through a started writer thread; `stop()` flushes it."""
        return cls(DecisionWriter(fd, min_level).start())

    def log_decision(
        self, request: HttpRequest, decision: Decision, seconds: float, level: int | None, protocol: str = "grpc"
    ) -> None:
        """One structured line per decision, at the configured level (None: off)."""
        writer = self.writer
        if writer is None:
            log_via_logging(request, decision, seconds, level, protocol)
        elif level is not None and level >= writer.min_level:
            if decision.path is not None:
                request = request._replace(path=decision.path)  # what the policies judged, not what was sent
            writer.submit(time.time(), level, request, decision, seconds, protocol)

    def dropped(self) -> int:
        """Lines dropped so far because the writer was behind (for Metrics.track_decision_log)."""
        return self.writer.dropped if self.writer is not None else 0

    def stop(self) -> None:
        """Flush and stop the writer thread (once the process has stopped checking)."""
        if self.writer is not None:
            self.writer.stop()

    @staticmethod
    def log_internal_error(err: BaseException) -> None:
        """See `log_internal_error`."""
        log_internal_error(err)

    @staticmethod
    def log_policy_timeout(err: PolicyTimeout) -> None:
        """See `log_policy_timeout`."""
        log_policy_timeout(err)


# The three below keep no state (stdlib logging, whose handlers logs.setup_logging installs): the
# pure core (decide.py) calls the last two directly; DecisionLog exposes them for the runner.


def log_via_logging(
    request: HttpRequest, decision: Decision, seconds: float, level: int | None, protocol: str = "grpc"
) -> None:
    """A decision line through stdlib logging, synchronously: for tools and in-process tests (a
    DecisionLog without a writer). A serving process uses `DecisionLog.to_fd` instead."""
    if level is None or not decision_log.isEnabledFor(level):
        return
    if decision.path is not None:
        request = request._replace(path=decision.path)  # what the policies judged, not what was sent
    decision_log.log(level, "decision", extra={"fields": decision_fields(request, decision, seconds, protocol)})


def log_internal_error(err: BaseException) -> None:
    """Log an unexpected error by type and stack only: its message could quote a token."""
    # Locations only, no source lines: even those could carry a literal worth keeping out of logs.
    # The innermost frames only: a deep recursion must not turn into a 60 KB log line.
    stack = traceback.extract_tb(err.__traceback__)[-8:]
    frames = " <- ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(stack))
    log.error("internal error in Check: %s at %s", type(err).__name__, frames)


def log_dry_run_error(policy: str, err: BaseException) -> None:
    """A dry-run policy that raised (counted as would=deny, the request unaffected): the policy and
    the error's type, or a timed-out rule part; never a message that could quote a value."""
    what = err.what if isinstance(err, PolicyTimeout) else type(err).__name__
    log.warning("dry-run policy failed; counted as would deny", extra={"fields": {"policy": policy, "error": what}})


def log_policy_timeout(err: PolicyTimeout) -> None:
    """Log a policy that ran past its time budget: the policy and rule part, never the value."""
    log.warning(
        "policy evaluation timed out; request denied", extra={"fields": {"policy": err.policy, "rule": err.what}}
    )
