"""Prometheus metrics: what happened, by outcome, never by whom.

One `Metrics` per serving process (its registry passed in, so tests and workers own theirs). A
single process serves its registry on /metrics. With `server.workers > 1` each worker counts into
prometheus-client's multiprocess files and the supervisor serves their sum
(`supervisor_registry`), with the process figures of every process read from /proc.

No series carries a `_created` sample: prometheus-client's multiprocess mode cannot write one, and
the plain numbers a Check adds to have none, so one rule for every counter and histogram
(`disable_created_metrics`, prometheus-client's process-wide switch, set by `Metrics`).
"""

from __future__ import annotations

import bisect
import gc
import itertools
import math
import os
import platform
import resource
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from authz_service import __version__
from authz_service.model import Decision, Outcome, Reason

# prometheus-client's multiprocess mode: set in supervised workers (server/workers.py), whose
# metrics live in files under this directory that the supervisor adds up at each scrape.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# The metrics every Check touches: (name, help), shared by both ways of counting them.
_CHECKS = ("authz_checks", "Checks by decision, reason and protocol (grpc: ext_authz Check; http: HTTP mode)")
_LATENCY = ("authz_check_duration_seconds", "Check latency inside the service, by protocol")
_CACHE_EVENTS = ("authz_cache_events", "Token cache lookups by cache and result (hit, miss, error)")
_POLICY_ALLOWS = ("authz_policy_allows", "Checks allowed, by the configured AccessPolicy that allowed them first")
_DRY_RUN = (
    "authz_policy_dry_run",
    "Dry-run AccessPolicies' answers (would allow, would deny) on the checks that reached the policies",
)
_WOULD = ("allow", "deny")
# The histogram's `le` labels, written as prometheus-client writes them ("0.0005" ... "5.0", "+Inf").
_LATENCY_LE = tuple(floatToGoString(bound) for bound in (*_LATENCY_BUCKETS, math.inf))  # type: ignore[no-untyped-call]

# Read from the process rather than counted: (name, help).
_IN_FLIGHT = ("authz_checks_in_flight", "Checks being decided now (summed across workers)")
_DROPPED = (
    "authz_decision_log_dropped",
    "Decision log lines dropped because the writer was behind (a stalled log reader)",
)
_BUILD_INFO = ("authz_build_info", "The running authz-service version (and Python's); always 1")

RELOAD_RESULTS = ("ok", "invalid", "error")
"""`authz_config_reloads_total{result}`: applied; refused by validation (the running config is
kept); failed while applying (an internal error: the running config is kept)."""


class Observe(Protocol):
    """Metrics.observe: count a decision, its latency and the policy that allowed it."""

    def __call__(self, decision: Decision, seconds: float, protocol: str = "grpc") -> None: ...


def _no_created() -> None:
    """No `_created` series, for any family of the process (see the module docstring)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]


class _LoopCounts:
    """The per-Check metrics as plain numbers the loop adds to, turned into metric families when
    the registry is collected (a scrape, served on the same loop).

    prometheus-client's values take a lock per increment and its histogram walks the buckets in
    Python: ~2 µs a Check in a tight loop, ~4.5 µs inside a loaded server, against ~0.5 µs here.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._checks: dict[tuple[Outcome, Reason, str], int] = {}
        # protocol -> a count per bucket (the last one +Inf), then the sum of the seconds
        self._latency: dict[str, list[float]] = {}
        self._cache: dict[tuple[str, str], int] = {}
        self._allows: dict[str, int] = {}  # configured policy ids only (set_policies)
        self._dry_run: dict[tuple[str, str], int] = {}  # (policy, would) of configured dry-run policies only
        registry.register(self)

    def observe(self, decision: Decision, seconds: float, protocol: str = "grpc") -> None:
        key = (decision.outcome, decision.reason, protocol)
        self._checks[key] = self._checks.get(key, 0) + 1
        latency = self._latency.get(protocol)
        if latency is None:
            latency = self._latency[protocol] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
        latency[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # `le`: the first bound >= seconds
        latency[-1] += seconds
        policy = decision.policy
        if policy is not None and policy in self._allows:
            self._allows[policy] += 1
        if decision.dry_run:
            dry_run = self._dry_run
            for answer in decision.dry_run:
                if answer in dry_run:
                    dry_run[answer] += 1

    def cache_event(self, cache: str, event: str) -> None:
        key = (cache, event)
        self._cache[key] = self._cache.get(key, 0) + 1

    def set_policies(self, ids: Iterable[str], dry_run: Iterable[str] = ()) -> None:
        # A policy that is gone loses its series (ids are unbounded over a process's life: the
        # API writes them); one that stays keeps its count.
        self._allows = {policy: self._allows.get(policy, 0) for policy in ids}
        self._dry_run = {(p, w): self._dry_run.get((p, w), 0) for p in dry_run for w in _WOULD}

    def describe(self) -> list[Metric]:
        """The families' names, so the registry refuses a second collector of the same names."""
        return [
            CounterMetricFamily(*_CHECKS),
            HistogramMetricFamily(*_LATENCY),
            CounterMetricFamily(*_CACHE_EVENTS),
            CounterMetricFamily(*_POLICY_ALLOWS),
            CounterMetricFamily(*_DRY_RUN),
        ]

    def collect(self) -> Iterator[Metric]:
        """The families as they stand (list() copies: a scrape never sees a dict change size)."""
        checks = CounterMetricFamily(*_CHECKS, labels=["decision", "reason", "protocol"])
        for (outcome, reason, protocol), count in list(self._checks.items()):
            checks.add_metric([outcome.value, reason.label, protocol], count)
        yield checks
        latency = HistogramMetricFamily(*_LATENCY, labels=["protocol"])
        for protocol, values in list(self._latency.items()):
            cumulative = itertools.accumulate(values[:-1])
            latency.add_metric([protocol], list(zip(_LATENCY_LE, cumulative, strict=True)), values[-1])
        yield latency
        cache = CounterMetricFamily(*_CACHE_EVENTS, labels=["cache", "event"])
        for labels, count in list(self._cache.items()):
            cache.add_metric(list(labels), count)
        yield cache
        allows = CounterMetricFamily(*_POLICY_ALLOWS, labels=["policy"])
        for policy, count in list(self._allows.items()):
            allows.add_metric([policy], count)
        yield allows
        dry_run = CounterMetricFamily(*_DRY_RUN, labels=["policy", "would"])
        for labels, count in list(self._dry_run.items()):
            dry_run.add_metric(list(labels), count)
        yield dry_run


class _PrometheusCounts:
    """The per-Check metrics through prometheus-client's own values: in supervised workers only
    they write the files the supervisor reads (label children resolved once: labels() costs ~3 µs)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(*_CHECKS, ["decision", "reason", "protocol"], registry=registry)
        self.latency = Histogram(*_LATENCY, ["protocol"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.cache_events = Counter(*_CACHE_EVENTS, ["cache", "event"], registry=registry)
        self.allows = Counter(*_POLICY_ALLOWS, ["policy"], registry=registry)
        self.dry_run = Counter(*_DRY_RUN, ["policy", "would"], registry=registry)
        self._dry_run_children: dict[tuple[str, str], Any] = {}
        self._children: dict[tuple[Outcome, Reason, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._cache_children: dict[tuple[str, str], Any] = {}
        self._allow_children: dict[str, Any] = {}

    def observe(self, decision: Decision, seconds: float, protocol: str = "grpc") -> None:
        key = (decision.outcome, decision.reason, protocol)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.checks.labels(decision.outcome.value, decision.reason.label, protocol)
        child.inc()
        latency = self._latency_children.get(protocol)
        if latency is None:
            latency = self._latency_children[protocol] = self.latency.labels(protocol)
        latency.observe(seconds)
        policy = decision.policy
        if policy is not None:
            allows = self._allow_children.get(policy)
            if allows is not None:
                allows.inc()
        if decision.dry_run:
            for answer in decision.dry_run:
                child = self._dry_run_children.get(answer)
                if child is not None:
                    child.inc()

    def cache_event(self, cache: str, event: str) -> None:
        child = self._cache_children.get((cache, event))
        if child is None:
            child = self._cache_children[(cache, event)] = self.cache_events.labels(cache, event)
        child.inc()

    def set_policies(self, ids: Iterable[str], dry_run: Iterable[str] = ()) -> None:
        self._set_dry_run([(policy, would) for policy in dry_run for would in _WOULD])
        # The series of a policy that is gone stays in this worker's file (multiprocess files
        # cannot forget a key) until the supervisor restarts; it stops growing.
        wanted = dict.fromkeys(ids)  # in the config's order, as the plain numbers keep them
        for policy in [p for p in self._allow_children if p not in wanted]:
            del self._allow_children[policy]
            self.allows.remove(policy)
        for policy in wanted:
            if policy not in self._allow_children:
                self._allow_children[policy] = self.allows.labels(policy)  # 0 until it allows

    def _set_dry_run(self, wanted: list[tuple[str, str]]) -> None:
        # As the allows above: a dry-run policy that is gone (or now enforces) stops counting.
        for labels in [key for key in self._dry_run_children if key not in wanted]:
            del self._dry_run_children[labels]
            self.dry_run.remove(*labels)
        for labels in wanted:
            if labels not in self._dry_run_children:
                self._dry_run_children[labels] = self.dry_run.labels(*labels)


class _ReadAtScrape:
    """Figures the process keeps itself (checks in flight, dropped log lines), read when the
    registry is collected: nothing on the Check path."""

    def __init__(
        self, registry: CollectorRegistry, in_flight: list[Callable[[], int]], dropped: list[Callable[[], int]]
    ) -> None:
        self._in_flight = in_flight
        self._dropped = dropped
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(*_IN_FLIGHT), CounterMetricFamily(*_DROPPED)]

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(*_IN_FLIGHT, value=sum(source() for source in self._in_flight))
        yield CounterMetricFamily(*_DROPPED, value=sum(source() for source in self._dropped))


class _WrittenAtRefresh:
    """The same figures in a supervised worker: written into its multiprocess files by
    `Metrics.refresh` (every few seconds, and the supervisor adds them up), with the worker's
    garbage collector's counts, which prometheus-client's GCCollector cannot put in files."""

    def __init__(
        self, registry: CollectorRegistry, in_flight: list[Callable[[], int]], dropped: list[Callable[[], int]]
    ) -> None:
        self._in_flight_sources = in_flight
        self._dropped_sources = dropped
        self._in_flight = Gauge(*_IN_FLIGHT, registry=registry, multiprocess_mode="livesum")
        self._dropped = Counter(*_DROPPED, registry=registry)
        self._dropped_seen = 0
        self._gc = [
            Counter(name, documentation, ["generation"], registry=registry)
            for name, documentation in (
                ("python_gc_objects_collected", "Objects collected during gc"),
                ("python_gc_objects_uncollectable", "Uncollectable objects found during GC"),
                ("python_gc_collections", "Number of times this generation was collected"),
            )
        ]
        self._gc_seen: dict[tuple[int, int], int] = {}

    def refresh(self) -> None:
        self._in_flight.set(sum(source() for source in self._in_flight_sources))
        dropped = sum(source() for source in self._dropped_sources)
        if dropped > self._dropped_seen:
            self._dropped.inc(dropped - self._dropped_seen)
        self._dropped_seen = dropped
        for generation, stats in enumerate(gc.get_stats()):
            for index, key in enumerate(("collected", "uncollectable", "collections")):
                value = stats[key]
                seen = self._gc_seen.get((index, generation), 0)
                if value > seen:
                    self._gc[index].labels(str(generation)).inc(value - seen)
                self._gc_seen[(index, generation)] = value


class BuildInfo:
    """`authz_build_info{version, python}` 1: which release a scrape came from."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._family = GaugeMetricFamily(*_BUILD_INFO, labels=["version", "python"])
        self._family.add_metric([__version__, platform.python_version()], 1)
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(*_BUILD_INFO)]

    def collect(self) -> Iterator[Metric]:
        yield self._family


class Metrics:
    """Prometheus metrics of one process (registry passed in so tests and workers own theirs).

    The four a Check touches (authz_checks, authz_check_duration_seconds, authz_cache_events,
    authz_policy_allows) are counted in plain numbers (`_LoopCounts`), except in supervised workers
    (`PROMETHEUS_MULTIPROC_DIR` set, or `in_files`), where prometheus-client's values count them
    (`_PrometheusCounts`): the same names, labels and buckets either way. A single process also
    exports prometheus-client's process, platform and GC collectors and `authz_build_info`; with
    workers the supervisor exports those (`supervisor_registry`).
    """

    def __init__(self, registry: CollectorRegistry, *, in_files: bool | None = None) -> None:
        _no_created()
        self.registry = registry
        self.in_files = MULTIPROC_ENV in os.environ if in_files is None else in_files
        per_check = _PrometheusCounts(registry) if self.in_files else _LoopCounts(registry)
        # The per-Check calls are the counters' own bound methods: no call through this class.
        self.observe: Observe = per_check.observe
        self.cache_event: Callable[[str, str], None] = per_check.cache_event
        """Count a token cache lookup (cache name, hit/miss/error)."""
        self._set_policies = per_check.set_policies
        self._in_flight_sources: list[Callable[[], int]] = []
        self._dropped_sources: list[Callable[[], int]] = []
        self._written: _WrittenAtRefresh | None = None
        if self.in_files:
            self._written = _WrittenAtRefresh(registry, self._in_flight_sources, self._dropped_sources)
        else:
            _ReadAtScrape(registry, self._in_flight_sources, self._dropped_sources)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
            BuildInfo(registry)
        self.upstream_calls = Counter(
            "authz_upstream_calls",
            "Calls to identity providers by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.jwks_staleness = Gauge(
            "authz_jwks_staleness_seconds",
            "Seconds past cache_ttl of the JWKS keys being served",
            ["introspector"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.jwks_skipped_keys = Counter(
            "authz_jwks_skipped_keys",
            "Unusable keys in fetched JWKS documents, per fetch, by introspector and reason (the log names the kid)",
            ["introspector", "reason"],
            registry=registry,
        )
        self.reloads = Counter(
            "authz_config_reloads",
            "Changes of the effective config by source (file, sighup, watch, store, api) and result "
            "(ok; invalid: refused by validation; error: failed while applying), the running config kept unless ok",
            ["source", "result"],
            registry=registry,
        )
        self._upstream_children: dict[tuple[str, str], Any] = {}

    def upstream_call(self, endpoint: str, outcome: str) -> None:
        """Count a call to an identity provider."""
        child = self._upstream_children.get((endpoint, outcome))
        if child is None:
            child = self._upstream_children[(endpoint, outcome)] = self.upstream_calls.labels(endpoint, outcome)
        child.inc()

    def jwks_skipped_key(self, introspector: str, reason: str) -> None:
        """Count a JWKS key we could not use (tokens/keys.py SkippedKey reasons)."""
        self.jwks_skipped_keys.labels(introspector, reason).inc()

    def set_policies(self, ids: Iterable[str], dry_run: Iterable[str] = ()) -> None:
        """The AccessPolicy ids `authz_policy_allows_total` may name: the configured ones, at start and
        at every reload (an id from anywhere else never creates a series); and `dry_run`, the ids of
        the configured dry-run policies, the only ones `authz_policy_dry_run_total` names."""
        self._set_policies(ids, dry_run)

    def reload(self, source: str, result: str) -> None:
        """Count a reload of the effective config (`result`: one of RELOAD_RESULTS)."""
        if result not in RELOAD_RESULTS:
            raise ValueError(f"reload result {result!r} is none of {RELOAD_RESULTS}")  # a bounded label
        self.reloads.labels(source, result).inc()

    def track_in_flight(self, source: Callable[[], int]) -> None:
        """Export `source()` (a runner's checks in flight) as authz_checks_in_flight, summed with
        every other source; read at scrape time (or `refresh` in a worker), never per check."""
        self._in_flight_sources.append(source)

    def track_decision_log(self, dropped: Callable[[], int]) -> None:
        """Export `dropped()` (DecisionLog.dropped) as authz_decision_log_dropped_total."""
        self._dropped_sources.append(dropped)

    def refresh(self) -> None:
        """Write the figures read from the process into a worker's files (before a scrape, and
        every few seconds in a worker); a single process reads them at scrape time instead."""
        if self._written is not None:
            self._written.refresh()


class ApiMetrics:
    """The resource API's writes, by writer (the `api.tokens` name), resource type and action
    (create, update, delete): who changed what, to alert on and to compare with the audit lines."""

    def __init__(self, registry: CollectorRegistry) -> None:
        _no_created()
        self.writes = Counter(
            "authz_api_writes",
            "Resources changed through the resource API, by writer (api.tokens name), type and action",
            ["writer", "type", "action"],
            registry=registry,
        )
        self.allow_everything = Counter(
            "authz_api_allow_everything_writes",
            "AccessPolicies written through the resource API whose rule allows every request, by writer",
            ["writer"],
            registry=registry,
        )

    def write(self, writer: str, kind: str, action: str) -> None:
        """Count one resource created, updated or deleted."""
        self.writes.labels(writer, kind, action).inc()


# -- a supervisor and its workers ----------------------------------------------------------------


class ProcessGroupCollector:
    """process_* for a supervisor and its workers, as one service: read from /proc at each scrape
    (prometheus-client's ProcessCollector per pid), combined so the usual queries keep their meaning.

    - process_cpu_seconds_total: every process's, plus the workers that exited (the supervisor's
      RUSAGE_CHILDREN once it reaped them), so the counter never goes back when a worker restarts;
    - process_resident_memory_bytes, process_virtual_memory_bytes: the sum;
    - process_open_fds: the highest of any process, and process_max_fds the lowest limit, so
      `open_fds / max_fds` alerts when any one process nears its own limit;
    - process_start_time_seconds: the supervisor's (the oldest).
    """

    def __init__(self, workers: Callable[[], Iterable[int]], registry: CollectorRegistry, proc: str = "/proc") -> None:
        self._workers = workers
        self._proc = proc
        self._readers: dict[int, ProcessCollector] = {}  # by pid; one for each live process
        registry.register(self)

    def _reader(self, pid: int) -> ProcessCollector:
        reader = self._readers.get(pid)
        if reader is None:
            reader = ProcessCollector(pid=lambda: pid, proc=self._proc, registry=None)
            self._readers[pid] = reader
        return reader

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(name, "") for name in _PROCESS_FAMILIES]

    def collect(self) -> Iterator[Metric]:
        figures: dict[str, list[float]] = {}
        pids = [os.getpid(), *self._workers()]
        for gone in set(self._readers) - set(pids):
            del self._readers[gone]
        for pid in pids:
            for family in self._reader(pid).collect():
                for sample in family.samples:
                    figures.setdefault(sample.name, []).append(sample.value)
        if not figures:
            return  # no /proc: nothing to say, as ProcessCollector says nothing
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = figures.get("process_cpu_seconds_total")
        if cpu:
            seconds = sum(cpu) + children.ru_utime + children.ru_stime
            yield CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent in seconds", seconds)
        for name, how, documentation in _PROCESS_GAUGES:
            values = figures.get(name)
            if values:
                yield GaugeMetricFamily(name, documentation, how(values))


_PROCESS_GAUGES: tuple[tuple[str, Callable[[list[float]], float], str], ...] = (
    ("process_resident_memory_bytes", sum, "Resident memory size in bytes, summed over the processes"),
    ("process_virtual_memory_bytes", sum, "Virtual memory size in bytes, summed over the processes"),
    ("process_open_fds", max, "Open file descriptors of the process with the most"),
    ("process_max_fds", min, "The lowest open file descriptor limit of the processes"),
    ("process_start_time_seconds", min, "Start time of the supervisor since unix epoch in seconds"),
)
_PROCESS_FAMILIES = ("process_cpu_seconds", *(name for name, _, _ in _PROCESS_GAUGES))


def supervisor_registry(metrics_dir: str, workers: Callable[[], Iterable[int]]) -> CollectorRegistry:
    """What a supervisor serves on /metrics: its workers' files added up, process_* of the whole
    group, python_info and authz_build_info (the same interpreter and release as the workers)."""
    _no_created()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    ProcessGroupCollector(workers, registry)
    PlatformCollector(registry=registry)
    BuildInfo(registry)
    return registry
