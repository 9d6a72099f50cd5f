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
import sys
import tempfile
import time
from collections.abc import Mapping
from multiprocessing.process import BaseProcess

from prometheus_client import multiprocess

from authz_service import loop
from authz_service.config.model import Config
from authz_service.engine import Engine, build_engine, well_known_documents
from authz_service.errors import ConfigError, ListenError
from authz_service.logs import setup_logging
from authz_service.metrics import MULTIPROC_ENV, ApiMetrics, supervisor_registry
from authz_service.registries import load_config
from authz_service.server.admin import AdminServer
from authz_service.server.api import ResourceApi
from authz_service.server.service import WorkerSlot, ready_marker, serve
from authz_service.server.sync import ConfigSync, load_store, read_status, status_file
from authz_service.store import open_store
from authz_service.store.base import Key, Resource, ResourceStore, StoreError
from authz_service.store.resources import ConfigFile, compose, read_config_file
from authz_service.tokens.cache import CacheFactory
from authz_service.upstream import UpstreamClient

log = logging.getLogger(__name__)

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0)  # seconds before restarting a worker that keeps dying
APPLY_WAIT = 2.0  # seconds an API write waits for every worker to decide with it


def _worker_main(path: str, index: int, log_level: str | None) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter, no inherited loop)."""
    config = load_config(path)
    setup_logging(log_level or config.logging.level)
    log.info("worker starting", extra={"fields": {"worker": index}})
    try:
        loop.run(serve(config, path, worker=WorkerSlot(index, os.environ[MULTIPROC_ENV])))
    except (ConfigError, StoreError) as err:
        # The file or the store changed since the supervisor checked them: say why, and let the
        # supervisor restart this worker (with back-off) until they are usable again.
        problems = [str(p) for p in err.problems] if isinstance(err, ConfigError) else [err.message]
        log.error("worker cannot start", extra={"fields": {"worker": index, "problems": problems}})
        sys.exit(1)
    except ListenError as err:
        # An address no restart can bind: the supervisor stops everything and exits 2 with this line.
        print(f"authz-service: {err}", file=sys.stderr, flush=True)
        sys.exit(LISTEN_EXIT)


# A worker's exit code for "cannot listen": not restarted (it would fail the same way, forever).
LISTEN_EXIT = 2


class Supervisor:
    """Keeps N workers alive and relays signals; serves /healthz, /readyz, /metrics."""

    def __init__(self, path: str, config: Config, log_level: str | None) -> None:
        self.path = path
        self.config = config
        self._documents_for: Config | None = None  # the config self._documents were built from
        self._documents: Mapping[str, bytes] = {}
        self.exit_code = 0
        self.log_level = log_level
        self.metrics_dir = os.environ.get(MULTIPROC_ENV) or ""
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._failures: dict[int, int] = {}
        self._stopping = False
        self._tasks: set[asyncio.Future[bool]] = set()
        self.sync: ConfigSync | None = None  # the config file (and store) the resource API validates against

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

    def signal_workers(self, sig: signal.Signals) -> None:
        """Send `sig` to every ready worker (one still starting has no handler yet: it would die)."""
        for pid in self.live_workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _signal_all(self, sig: signal.Signals) -> None:
        for process in self._workers.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, sig)

    async def run(self) -> int:
        """Until SIGTERM/SIGINT. Raises ConfigError or StoreError (before any worker starts) when the
        config file with the store's resources is not valid, or the store stays unreachable."""
        loop = asyncio.get_running_loop()
        store = await self._open_resources()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        admin = None
        tester: SupervisorEngine | None = None
        watch = asyncio.ensure_future(self.sync.watch_file()) if self.sync is not None else None
        if self.config.server.admin_listen is not None:
            # The workers' files added up, and process_* of the supervisor and every live worker.
            registry = supervisor_registry(self.metrics_dir, self.worker_pids)
            api = None
            if self.config.api.enabled and self.sync is not None and store is not None:
                backend = SupervisorBackend(self, self.sync)
                tester = SupervisorEngine(self.sync)
                # The supervisor's own counter (in memory, in the registry it serves) next to the workers' files.
                metrics = ApiMetrics(registry)
                api = ResourceApi(self.config.api.writers, backend, self.config.api.max_body_bytes, tester, metrics)
            details = self.store_status if store is not None else None
            admin = AdminServer(
                self.config.server.admin_listen,
                registry,
                self.ready,
                api=api,
                details=details,
                tls=self.config.server.admin_tls,
                well_known=self._well_known,
            )
            await admin.start()  # before any worker: a busy admin port stops the start with nothing to clean
        for index in range(self.config.server.workers):
            self._start(index)
        while not stop.is_set():
            if self._reap_and_restart():
                self.exit_code = LISTEN_EXIT
                stop.set()
                break
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
        if tester is not None:
            await tester.close()
        if watch is not None:
            watch.cancel()
        if store is not None:
            await store.close()
        return self.exit_code

    async def _open_resources(self) -> ResourceStore | None:
        """The config file and the store, checked together as the workers will load them."""
        file = await asyncio.to_thread(read_config_file, self.path)
        store = None
        snapshot = None
        if file.config.api.store is not None:
            store = open_store(file.config.api.store)
            await store.open()
            try:
                snapshot = await load_store(store)
                await asyncio.to_thread(compose, file, snapshot.resources)
            except BaseException:
                await store.close()
                raise
        self.sync = ConfigSync(file, store, snapshot, apply=None)
        return store

    def _well_known(self) -> Mapping[str, bytes]:
        """The identity token's documents for the supervisor's admin listener, from the config file
        as last read (a reload that rotates keys publishes them here too), built once per read."""
        config = self.sync.file.config if self.sync is not None else self.config
        if config is not self._documents_for:
            self._documents = well_known_documents(config)
            self._documents_for = config
        return self._documents

    def _on_hup(self) -> None:
        self.signal_workers(signal.SIGHUP)  # a worker still starting reads the file as it is now
        if self.sync is not None:
            task = asyncio.ensure_future(self.sync.reload_file("sighup"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes running now, ready or not (their CPU and memory count)."""
        return [p.pid for p in self._workers.values() if p.pid is not None and p.is_alive()]

    def live_workers(self) -> list[int]:
        """The pids of the workers that are up (ready), the ones an API write waits for."""
        return [
            p.pid
            for p in self._workers.values()
            if p.pid is not None and p.is_alive() and ready_marker(self.metrics_dir, p.pid).exists()
        ]

    def worker_reports(self) -> dict[int, dict[str, object] | None]:
        return {pid: read_status(status_file(self.metrics_dir, pid)) for pid in self.live_workers()}

    def store_status(self) -> dict[str, object]:
        """/readyz: the store as the workers see it (each polls it; the supervisor only writes)."""
        reports = self.worker_reports()
        reachable = all(r is not None and r.get("store_up") for r in reports.values())
        store: dict[str, object] = {
            "backend": self.sync.store.backend if self.sync is not None and self.sync.store is not None else None,
            "reachable": reachable,
            "workers": [
                {
                    "pid": pid,
                    "version": (r or {}).get("version"),
                    "reachable": bool((r or {}).get("store_up")),
                    **({"regressed": (r or {}).get("regressed")} if (r or {}).get("regressed") is not None else {}),
                }
                for pid, r in reports.items()
            ],
        }
        if not reachable:
            store["note"] = "deciding with the resources last loaded"
        if any(r is not None and r.get("regressed") is not None for r in reports.values()):
            store["note"] = "the store went back; workers decide with the resources last loaded (docs/resources.md)"
        return {"store": store}

    def _reap_and_restart(self) -> bool:
        """Restart the workers that exited; True when one could not listen (then nothing restarts)."""
        for index, process in list(self._workers.items()):
            if process.is_alive():
                continue
            process.join(0)
            if process.exitcode == LISTEN_EXIT:
                del self._workers[index]
                return True
            pid = process.pid or 0
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            ready_marker(self.metrics_dir, pid).unlink(missing_ok=True)
            status_file(self.metrics_dir, pid).unlink(missing_ok=True)
            failures = self._failures.get(index, 0)
            log.error(
                "worker exited; restarting it",
                extra={"fields": {"worker": index, "pid": pid, "exitcode": process.exitcode}},
            )
            self._failures[index] = failures + 1
            del self._workers[index]
            delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]
            asyncio.get_running_loop().call_later(delay, self._restart_if_running, index)
        return False

    def _restart_if_running(self, index: int) -> None:
        if not self._stopping and index not in self._workers:
            self._start(index)


class SupervisorEngine:
    """test-policy in a supervisor, which decides nothing itself: an engine built as the workers
    build theirs, from the config file and the store as they are now, kept while they do not
    change. It has its own IdP client and caches, so it verifies tokens exactly as a worker does."""

    def __init__(self, sync: ConfigSync) -> None:
        self._sync = sync
        self._engine: Engine | None = None
        self._built_from: tuple[str, str | None] | None = None  # (file digest, store version)
        self._client: UpstreamClient | None = None
        self._caches: CacheFactory | None = None
        self._snapshot = sync.snapshot  # the newest store content seen: an older one is kept out, as workers do

    async def __call__(self) -> Engine:
        store = self._sync.store
        # The store's version is one cheap read; load, validate and compile only when it or the
        # file changed since the engine was built.
        source = (self._sync.file.digest, await store.version() if store is not None else None)
        if self._engine is None or source != self._built_from:
            loaded = await store.load() if store is not None else None
            snapshot, kept = loaded, self._snapshot
            if loaded is not None and kept is not None and (loaded.generation or 0) < (kept.generation or 0):
                snapshot = kept  # the store went back (see ConfigSync): decide as the workers do
            self._snapshot = snapshot
            config = await asyncio.to_thread(self._sync.compose, snapshot.resources if snapshot else {})
            if self._client is None or self._caches is None:
                self._client, self._caches = UpstreamClient(), CacheFactory(config.cache)
            self._engine = build_engine(config, self._client, self._caches, previous=self._engine)
            self._built_from = (source[0], loaded.version if loaded else None)
        return self._engine

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._caches is not None:
            await self._caches.close()


class SupervisorBackend:
    """The resource API in a supervisor, which has no engine: it validates against the file and
    the store like a worker would, writes, then waits for every worker to decide with the write."""

    def __init__(self, supervisor: Supervisor, sync: ConfigSync) -> None:
        self._supervisor = supervisor
        self._sync = sync

    @property
    def file(self) -> ConfigFile:
        return self._sync.file

    @property
    def store(self) -> ResourceStore | None:
        return self._sync.store

    def compose(self, resources: Mapping[Key, Resource]) -> Config:
        return self._sync.compose(resources)

    @property
    def write_floor(self) -> int | None:
        """The highest store counter a worker decides with (their reports), or the one loaded at start."""
        reported = [r.get("generation") for r in self._supervisor.worker_reports().values() if r is not None]
        numbers = [n for n in (*reported, self._sync.write_floor) if isinstance(n, int)]
        return max(numbers) if numbers else None

    async def applied(self) -> tuple[int, str] | None:
        store = self._sync.store
        assert store is not None
        self._supervisor.signal_workers(signal.SIGUSR1)  # look now, not at the next poll
        deadline = time.monotonic() + APPLY_WAIT
        behind: list[int] = []
        while True:
            try:
                current = await store.version()
            except StoreError as err:
                return 503, f"the store cannot be read back ({err.message})"
            reports = self._supervisor.worker_reports()
            behind = [pid for pid, r in reports.items() if r is None or r.get("version") != current]
            # Polled: the workers are other processes; their reports are files.
            if not behind or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        if behind:
            return (
                504,
                f"{len(behind)} of {len(reports)} worker(s) did not decide with it within {APPLY_WAIT:g} s "
                "(they will once they load it; see their log)",
            )
        return None


def run_supervised(path: str, config: Config, log_level: str | None) -> int:
    """Run the supervisor until SIGTERM/SIGINT; metrics files live in a private temp directory."""
    directory = tempfile.mkdtemp(prefix="authz-metrics-")
    # Must be set before any worker imports prometheus_client: it picks its storage at import.
    os.environ[MULTIPROC_ENV] = directory
    try:
        return asyncio.run(Supervisor(path, config, log_level).run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
