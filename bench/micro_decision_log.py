"""What one decision log line costs a Check: authz_service.observe.log_decision with the writer
thread running, as the service runs it (decision lines at info, the default).

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

from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.observe import decision_writer, log_decision, start_decision_writer, stop_decision_writer

BATCH = 1000
BATCHES_PER_ROUND = 50
WRITER_THREAD = "decision-log"  # observe.DecisionWriter's thread name


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
    return request, Decision(Outcome.ALLOW, Reason.ALLOWED, identity)


def writer_cpu() -> float:
    """CPU seconds the writer thread has used so far."""
    for thread in threading.enumerate():
        if thread.name == WRITER_THREAD and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    raise RuntimeError("the decision log writer thread is not running")


async def one_round(request: HttpRequest, decision: Decision) -> tuple[float, float, int]:
    """(loop µs per call, writer µs per line, lines) over BATCHES_PER_ROUND batches."""
    writer = decision_writer()
    assert writer is not None
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
    start_decision_writer(devnull, logging.INFO)
    try:
        await one_round(request, decision)  # warm-up: caches, the writer's timestamp prefix
        results = [await one_round(request, decision) for _ in range(rounds)]
        writer = decision_writer()
        assert writer is not None
        written, dropped = writer.written, writer.dropped
    finally:
        stop_decision_writer()
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        from authz_service.loop import run  # the loop the service runs on (uvloop when installed)
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(measure(args.rounds))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
