"""`server.workers: N`: a supervisor and N serving processes sharing one port (SO_REUSEPORT).

grpc.aio is bound to one core by the GIL, so throughput past one core needs processes. The
supervisor owns nothing on the Check path: it starts the workers, restarts one that dies,
forwards SIGTERM/SIGHUP to all of them, and serves the admin HTTP endpoints, with metrics
aggregated across workers by prometheus-client's multiprocess mode.

Envoy opens one HTTP/2 connection per worker thread per host, and the kernel balances
SO_REUSEPORT per connection, so behind one Envoy thread all checks would land on one process.
`server.worker_base_port: P` makes worker i also listen on P+i; list those as separate endpoints
of Envoy's authz cluster and Envoy balances checks across processes per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.multiprocess import MultiProcessCollector

from authz_service import loop
from authz_service.config.model import Config
from authz_service.config.validate import load_config
from authz_service.logs import setup_logging
from authz_service.server.admin import AdminServer
from authz_service.server.service import MULTIPROC_ENV, WorkerSlot, ready_marker, serve

log = logging.getLogger(__name__)

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0)  # seconds before restarting a worker that keeps dying


def _worker_main(path: str, index: int, log_level: str | None) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter, no inherited loop)."""
    config = load_config(path)
    setup_logging(log_level or config.logging.level)
    log.info("worker starting", extra={"fields": {"worker": index}})
    loop.run(serve(config, path, worker=WorkerSlot(index, os.environ[MULTIPROC_ENV])))


class Supervisor:
    """Keeps N workers alive and relays signals; serves /healthz, /readyz, /metrics."""

    def __init__(self, path: str, config: Config, log_level: str | None) -> None:
        self.path = path
        self.config = config
        self.log_level = log_level
        self.metrics_dir = os.environ.get(MULTIPROC_ENV) or ""
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._failures: dict[int, int] = {}
        self._stopping = False

    def ready(self) -> bool:
        return (
            not self._stopping
            and len(self._workers) == self.config.server.workers
            and all(
                p.pid is not None and ready_marker(self.metrics_dir, p.pid).exists() for p in self._workers.values()
            )
        )

    def _start(self, index: int) -> None:
        process = self._context.Process(
            target=_worker_main, args=(self.path, index, self.log_level), name=f"authz-worker-{index}"
        )
        process.start()
        self._workers[index] = process
        log.info("worker started", extra={"fields": {"worker": index, "pid": process.pid}})

    def _signal_all(self, sig: signal.Signals) -> None:
        for process in self._workers.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
        for index in range(self.config.server.workers):
            self._start(index)
        admin = None
        if self.config.server.admin_address is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
            admin = AdminServer(self.config.server.admin_address, registry, self.ready)
            await admin.start()
        while not stop.is_set():
            self._reap_and_restart()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        self._stopping = True
        log.info("stopping workers", extra={"fields": {"workers": len(self._workers)}})
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.drain_delay + self.config.server.shutdown_grace + 5
        # A child process's exit is not awaitable here (multiprocessing): poll it.
        while any(p.is_alive() for p in self._workers.values()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for process in self._workers.values():
            if process.is_alive():
                log.warning("worker did not stop in time; killing it", extra={"fields": {"pid": process.pid}})
                process.kill()
            process.join(1)
        if admin is not None:
            await admin.stop()
        return 0

    def _reap_and_restart(self) -> None:
        for index, process in list(self._workers.items()):
            if process.is_alive():
                continue
            process.join(0)
            pid = process.pid or 0
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            ready_marker(self.metrics_dir, pid).unlink(missing_ok=True)
            failures = self._failures.get(index, 0)
            log.error(
                "worker exited; restarting it",
                extra={"fields": {"worker": index, "pid": pid, "exitcode": process.exitcode}},
            )
            self._failures[index] = failures + 1
            del self._workers[index]
            delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]
            asyncio.get_running_loop().call_later(delay, self._restart_if_running, index)

    def _restart_if_running(self, index: int) -> None:
        if not self._stopping and index not in self._workers:
            self._start(index)


def run_supervised(path: str, config: Config, log_level: str | None) -> int:
    """Run the supervisor until SIGTERM/SIGINT; metrics files live in a private temp directory."""
    directory = tempfile.mkdtemp(prefix="authz-metrics-")
    # Must be set before any worker imports prometheus_client: it picks its storage at import.
    os.environ[MULTIPROC_ENV] = directory
    try:
        return asyncio.run(Supervisor(path, config, log_level).run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
