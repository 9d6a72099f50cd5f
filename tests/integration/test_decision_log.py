"""The decision log off the event loop: a writer thread formats and writes; Check only enqueues.

A stalled log reader (a pipe nobody reads) must not stop a single check: lines are dropped and
counted instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import aiohttp
import pytest
import yaml

from authz_service.decisionlog import DecisionLog, DecisionWriter, _render, decision_fields
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.logs import JsonFormatter
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from tests.conftest import free_port, jwks_introspector

REQUEST = HttpRequest(method="GET", path="/orders/7?access_token=SECRET", request_id="req-1")
ALLOW = Decision(Outcome.ALLOW, Reason.ALLOWED, Identity("alice", {}, "idp", "jwt"), introspector="idp")


def _read_lines(fd: int) -> list[dict[str, object]]:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.decode().splitlines()]


def test_lines_have_the_shape_of_every_other_log_line() -> None:
    read, write = os.pipe()
    try:
        writer = DecisionWriter(write, logging.INFO).start()
        writer.submit(1_800_000_000.25, logging.INFO, REQUEST, ALLOW, 0.0012, "http")
        writer.stop()
        (line,) = _read_lines(read)
    finally:
        os.close(read)
        os.close(write)
    record = logging.LogRecord("authz_service.decision", logging.INFO, "", 0, "decision", (), None)
    record.created, record.msecs = 1_800_000_000.25, 250.0
    record.fields = decision_fields(REQUEST, ALLOW, 0.0012, "http")
    assert line == json.loads(JsonFormatter().format(record))
    assert line["path"] == "/orders/7"  # no query: it can carry a token
    assert "SECRET" not in json.dumps(line)


def test_a_full_queue_drops_and_counts_and_never_blocks() -> None:
    read, write = os.pipe()
    try:
        writer = DecisionWriter(write, logging.INFO, max_queue=10)  # not started: nothing drains
        started = time.perf_counter()
        for _ in range(1000):
            writer.submit(time.time(), logging.INFO, REQUEST, ALLOW, 0.001, "grpc")
        elapsed = time.perf_counter() - started
        assert writer.dropped == 990
        assert elapsed < 0.5  # 1,000 submissions against a writer that never writes
        writer.start()
        writer.stop()
        assert writer.written == 10
        assert len(_read_lines(read)) == 10
    finally:
        os.close(read)
        os.close(write)


def test_a_queued_line_keeps_its_request_strings_not_the_request() -> None:
    # A queued line must not keep each request's headers alive until the writer's next batch: a
    # full queue would hold ~27 MB, and in steady state the loop's allocations would spread over
    # megabytes instead of reusing the memory it has just freed.
    writer = DecisionWriter(1, logging.INFO, max_queue=2000)  # not started: the queue keeps every line
    decisions = DecisionLog(writer)
    token = "eyJ" + "x" * 600
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            headers = {f"x-header-{n}": f"value {n} of request {i}" for n in range(10)}
            headers["authorization"] = f"Bearer {token}{i}"
            request = HttpRequest(method="GET", path=f"/orders/{i}", headers=headers, request_id=f"req-{i}")
            decisions.log_decision(request, ALLOW, 0.001, logging.INFO, "http")
        per_line = (tracemalloc.get_traced_memory()[0] - before) / 1000
    finally:
        tracemalloc.stop()
    assert len(writer._queue) == 1000
    assert per_line < 600, f"{per_line:.0f} bytes kept per queued line"  # the whole request: ~2,000


def test_each_write_is_whole_lines_within_pipe_buf() -> None:
    # A SOCK_SEQPACKET pair keeps each os.write as one message, so the test sees the writer's chunks.
    reader, writer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipe_buf = 4096
    requests = [HttpRequest(method="GET", path=f"/é/{'x' * (i * 7 % 250)}", request_id=f"req-{i}") for i in range(300)]
    # Request values are capped (redact), but an introspector's id comes from the config, uncapped:
    # a line longer than PIPE_BUF goes out whole, in a write of its own.
    long_id = Decision(Outcome.ALLOW, Reason.ALLOWED, Identity("alice", {}, "i" * 6000, "jwt"), introspector="i" * 6000)
    chunks: list[bytes] = []

    def read_all() -> None:  # concurrently: a socket pair queues only a few unread messages
        while chunk := reader.recv(65536):
            chunks.append(chunk)

    reading = threading.Thread(target=read_all)
    reading.start()
    try:
        writer = DecisionWriter(writer_end.fileno(), logging.INFO)
        for i, request in enumerate(requests):
            writer.submit(1_800_000_000.25, logging.INFO, request, long_id if i == 150 else ALLOW, 0.001, "http")
        writer.start()
        writer.stop()
        assert writer.written == len(requests)
    finally:
        writer_end.shutdown(socket.SHUT_WR)  # the reader's recv returns b""
        reading.join(5)
        reader.close()
        writer_end.close()
    assert len(chunks) > 10  # ~100 KB of lines: many writes
    for chunk in chunks:
        assert chunk.endswith(b"\n")  # only whole lines
        assert len(chunk) <= pipe_buf or chunk.count(b"\n") == 1, len(chunk)  # longer: one line alone
    lines = b"".join(chunks).decode().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [r.request_id for r in requests]
    assert max(len(chunk) for chunk in chunks) > pipe_buf  # the long line was written, in one piece


def test_on_a_file_a_batch_goes_out_in_few_large_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each os.write hands the GIL to the loop and back: on a file (where one write is one piece)
    # the writer uses 64 KiB chunks, not a pipe's 4 KiB.
    sizes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes | memoryview) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    path = tmp_path / "decisions.log"
    requests = [HttpRequest(method="GET", path=f"/orders/{'x' * (i % 90)}", request_id=f"req-{i}") for i in range(600)]
    with path.open("wb") as out:
        writer = DecisionWriter(out.fileno(), logging.INFO)
        for request in requests:
            writer.submit(1_800_000_000.25, logging.INFO, request, ALLOW, 0.001, "http")
        writer.start()
        writer.stop()
    data = path.read_bytes()
    assert [json.loads(line)["request_id"] for line in data.decode().splitlines()] == [r.request_id for r in requests]
    assert len(data) > 4 * 4096  # enough lines that 4 KiB chunks would take many writes
    assert max(sizes) > 4096, sizes
    assert len(sizes) <= -(-len(data) // 65536) + 1, sizes


def test_a_request_id_that_is_not_utf8_does_not_stop_the_writer() -> None:
    # aiohttp decodes header bytes that are not UTF-8 with surrogateescape: a client chooses them.
    read, write = os.pipe()
    try:
        writer = DecisionWriter(write, logging.INFO).start()
        hostile = HttpRequest(method="GET", path="/a/\udcff", request_id="req-\udc80")
        writer.submit(1_800_000_000.25, logging.INFO, hostile, ALLOW, 0.001, "http")
        writer.submit(1_800_000_000.25, logging.INFO, REQUEST, ALLOW, 0.001, "http")
        writer.stop()
        first, second = _read_lines(read)
    finally:
        os.close(read)
        os.close(write)
    assert str(first["request_id"]).startswith("sha256:")
    assert first["path"] == "/a/?"  # as every log line writes what UTF-8 cannot hold
    assert second["request_id"] == "req-1"  # the thread lived on


@pytest.mark.slow
async def test_checks_are_answered_promptly_while_nobody_reads_the_log(
    idp: DevIdentityProvider, tmp_path: Path
) -> None:
    grpc_port, admin_port, http_port = free_port(), free_port(), free_port()
    config = {
        "server": {
            "grpc_address": f"127.0.0.1:{grpc_port}",
            "admin_address": f"127.0.0.1:{admin_port}",
            "http_address": f"127.0.0.1:{http_port}",
            "drain_delay": 0,
        },
        "introspectors": [jwks_introspector(idp)],
        "authentication_only": True,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    # stderr is a pipe this test does not read until the end: it fills after ~64 KB of log lines.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "authz_service",
        "--config",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    token = idp.mint()
    url = f"http://127.0.0.1:{http_port}/ext_authz/orders"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the service did not become ready"
                await asyncio.sleep(0.1)
            slowest = 0.0

            async def client(count: int) -> None:
                nonlocal slowest
                for _ in range(count):
                    started = time.monotonic()
                    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                        assert response.status == 200
                    slowest = max(slowest, time.monotonic() - started)

            # 12,000 decision lines: the pipe holds ~250 of them and the writer's queue 10,000.
            await asyncio.gather(*(client(1500) for _ in range(8)))
            async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
                metrics = await response.text()
        # Synchronous writes to a full pipe would have stopped the loop for good at the first one.
        assert slowest < 2.0, slowest
        (dropped,) = [line for line in metrics.splitlines() if line.startswith("authz_decision_log_dropped_total ")]
        assert float(dropped.split()[1]) > 0
    finally:
        process.terminate()
        # Reading now unblocks the writer; what was written is whole JSON lines.
        _, output = await asyncio.wait_for(process.communicate(), 20)
    # ~12,000 lines: parsed off the loop (parsing them is the test's work, not a stall of the service's).
    text = output.decode()
    lines = await asyncio.to_thread(lambda: [json.loads(line) for line in text.splitlines()])
    decisions = [line for line in lines if line.get("logger") == "authz_service.decision"]
    assert decisions
    assert all(line["decision"] == "allow" for line in decisions)
    assert token not in text


@pytest.mark.parametrize(
    ("request_id", "path", "user_id", "method"),
    [
        ("req-1", "/a", "alice", "GET"),
        ('"quoted" \\ id', '/p"a\\th?q=1', 'u"\\\n\t\x00', 'PO"ST'),
        ("é✓\u2028", "/é/✓\U0001f600", "ü\u2029", "DELETE"),
        ("", "", "", ""),
        ("eyJhbGciOi.x.y", "/x", "x" * 500, "GET"),
        ("req-2", "/y", "bob", "M\u00e9" * 100),  # a hostile X-Forwarded-Method: capped alike
        ("req-\udc80", "/p/\udcff", "u", "G\udc80T"),  # HTTP mode: bytes not UTF-8 (surrogateescape)
    ],
)
def test_the_hand_built_line_is_exactly_json_dumps(request_id: str, path: str, user_id: str, method: str) -> None:
    # The writer builds lines by hand (a third of json.dumps' cost): any string must come out the same.
    for headers in TRACE_HEADERS:
        request = HttpRequest(method=method, path=path, request_id=request_id, headers=headers)
        for decision in (
            Decision(Outcome.ALLOW, Reason.ALLOWED, Identity(user_id, {}, 'i"d', "jwt"), introspector='i"d'),
            Decision(Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN),
            Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, Identity(None, {}, "idp", "opaque"), introspector="idp"),
            # Dry-run answers (policy ids are config strings: the hostile ones here stand for any).
            Decision(Outcome.ALLOW, Reason.ANONYMOUS, policy="p", dry_run=((request_id, "allow"), (user_id, "deny"))),
        ):
            writer = DecisionWriter(1, logging.INFO)  # not started: the line stays queued
            writer.submit(1_800_000_000.123, logging.WARNING, request, decision, 0.0123456, "http")
            line = _render(*writer._queue[0])
            record = logging.LogRecord("authz_service.decision", logging.WARNING, "", 0, "decision", (), None)
            record.created = 1_800_000_000.123
            record.fields = decision_fields(request, decision, 0.0123456, "http")
            assert line == JsonFormatter().format(record)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_HEADERS: list[dict[str, str]] = [
    {},
    {"traceparent": TRACEPARENT},
    {"traceparent": TRACEPARENT, "tracestate": "vendor=x"},
    {"traceparent": "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future"},
    {"traceparent": "garbage"},
    {"traceparent": TRACEPARENT.upper()},
    {"traceparent": '00-"},-' + "x" * 5000},
]


def test_a_traceparent_adds_the_trace_and_the_callers_span_and_nothing_else_changes() -> None:
    without = HttpRequest(method="GET", path="/a", request_id="req-1")
    with_trace = without._replace(headers={"traceparent": TRACEPARENT})
    invalid = without._replace(headers={"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"})
    writer = DecisionWriter(1, logging.INFO)  # not started: the lines stay queued
    for request in (without, with_trace, invalid):
        writer.submit(1_800_000_000.5, logging.INFO, request, ALLOW, 0.001, "grpc")
    plain, traced, ignored = (json.loads(_render(*item)) for item in writer._queue)
    assert traced == {**plain, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}
    assert list(traced)[-2:] == ["trace_id", "span_id"]  # optional fields go last
    assert ignored == plain  # an invalid traceparent: the line says nothing of it
    assert not {"trace_id", "span_id"} & set(plain)
