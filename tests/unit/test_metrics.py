"""metrics: counted by outcome, exposed as prometheus-client would, one `_created` rule, the
figures read from the process (in flight, dropped log lines, process_*), and no module state."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from authz_service.metrics import ApiMetrics, Metrics, ProcessGroupCollector, supervisor_registry
from authz_service.model import Decision, Outcome, Reason

# in_files: counted through prometheus-client's values (supervised workers) or in plain numbers.
BOTH_WAYS = pytest.mark.parametrize("in_files", [False, True], ids=["plain", "prometheus-client"])
ALLOW = Decision(Outcome.ALLOW, Reason.ALLOWED)


def allowed_by(policy: str) -> Decision:
    return Decision(Outcome.ALLOW, Reason.ALLOWED, policy=policy)


@BOTH_WAYS
def test_checks_are_counted_by_decision_reason_and_protocol(in_files: bool) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=in_files)
    metrics.observe(Decision(Outcome.UNAUTHENTICATED, Reason.EXPIRED), 0.002)
    metrics.observe(Decision(Outcome.UNAUTHENTICATED, Reason.EXPIRED), 0.004)
    metrics.observe(ALLOW, 0.001)
    metrics.observe(ALLOW, 0.001, protocol="http")
    expired = {"decision": "unauthenticated", "reason": "expired", "protocol": "grpc"}
    assert registry.get_sample_value("authz_checks_total", expired) == 2
    allowed = {"decision": "allow", "reason": "allowed"}
    assert registry.get_sample_value("authz_checks_total", {**allowed, "protocol": "grpc"}) == 1
    assert registry.get_sample_value("authz_checks_total", {**allowed, "protocol": "http"}) == 1
    grpc = {"protocol": "grpc"}
    assert registry.get_sample_value("authz_check_duration_seconds_count", grpc) == 3
    assert registry.get_sample_value("authz_check_duration_seconds_bucket", {**grpc, "le": "0.002"}) == 2
    assert registry.get_sample_value("authz_check_duration_seconds_count", {"protocol": "http"}) == 1


@BOTH_WAYS
def test_cache_and_upstream_events_are_counted(in_files: bool) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=in_files)
    metrics.cache_event("verified", "hit")
    metrics.cache_event("verified", "hit")
    metrics.cache_event("ext", "miss")
    metrics.upstream_call("jwks", "timeout")
    assert registry.get_sample_value("authz_cache_events_total", {"cache": "verified", "event": "hit"}) == 2
    assert registry.get_sample_value("authz_cache_events_total", {"cache": "ext", "event": "miss"}) == 1
    assert registry.get_sample_value("authz_upstream_calls_total", {"endpoint": "jwks", "outcome": "timeout"}) == 1


@BOTH_WAYS
def test_policy_allows_are_counted_for_configured_policies_only(in_files: bool) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=in_files)
    metrics.observe(allowed_by("before-any-config"), 0.001)
    metrics.set_policies(["public", "staff"])
    for _ in range(3):
        metrics.observe(allowed_by("public"), 0.001)
    metrics.observe(allowed_by("not-configured"), 0.001)  # never a series: ids come from the config
    metrics.observe(Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN), 0.001)

    def allows(policy: str) -> float | None:
        return registry.get_sample_value("authz_policy_allows_total", {"policy": policy})

    assert (allows("public"), allows("staff")) == (3, 0)  # a configured policy that never allowed: 0
    assert allows("not-configured") is None
    assert allows("before-any-config") is None
    # A reload drops a policy and adds one: the kept one keeps counting, the new one starts at 0.
    metrics.set_policies(["public", "admins"])
    metrics.observe(allowed_by("public"), 0.001)
    metrics.observe(allowed_by("staff"), 0.001)
    assert (allows("public"), allows("admins")) == (4, 0)
    assert allows("staff") is None


@BOTH_WAYS
def test_config_reloads_are_counted_by_source_and_result(in_files: bool) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=in_files)
    metrics.reload("sighup", "ok")
    metrics.reload("sighup", "ok")
    metrics.reload("store", "invalid")
    assert registry.get_sample_value("authz_config_reloads_total", {"source": "sighup", "result": "ok"}) == 2
    assert registry.get_sample_value("authz_config_reloads_total", {"source": "store", "result": "invalid"}) == 1


def test_in_flight_and_dropped_lines_are_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=False)
    assert registry.get_sample_value("authz_checks_in_flight") == 0
    grpc_in_flight, http_in_flight, dropped = [3], [2], [0]
    metrics.track_in_flight(lambda: grpc_in_flight[0])
    metrics.track_in_flight(lambda: http_in_flight[0])
    metrics.track_decision_log(lambda: dropped[0])
    assert registry.get_sample_value("authz_checks_in_flight") == 5
    grpc_in_flight[0], dropped[0] = 0, 7
    assert registry.get_sample_value("authz_checks_in_flight") == 2
    assert registry.get_sample_value("authz_decision_log_dropped_total") == 7


def test_a_worker_writes_them_at_refresh() -> None:
    # In a worker only prometheus-client's values reach the files the supervisor adds up.
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=True)
    in_flight, dropped = [4], [2]
    metrics.track_in_flight(lambda: in_flight[0])
    metrics.track_decision_log(lambda: dropped[0])
    metrics.refresh()
    assert registry.get_sample_value("authz_checks_in_flight") == 4
    assert registry.get_sample_value("authz_decision_log_dropped_total") == 2
    in_flight[0], dropped[0] = 1, 5
    metrics.refresh()
    metrics.refresh()  # a refresh with nothing new adds nothing
    assert registry.get_sample_value("authz_checks_in_flight") == 1
    assert registry.get_sample_value("authz_decision_log_dropped_total") == 5
    assert registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None


def test_a_single_process_exports_process_python_and_build_figures() -> None:
    registry = CollectorRegistry()
    Metrics(registry, in_files=False)
    assert registry.get_sample_value("process_resident_memory_bytes")
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    assert registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
    python = ".".join(map(str, sys.version_info[:3]))
    [platform] = [f for f in registry.collect() if f.name == "python_info"]
    assert platform.samples[0].labels["version"] == python
    [info] = [f for f in registry.collect() if f.name == "authz_build_info"]
    [sample] = info.samples
    assert sample.value == 1
    assert sample.labels["python"] == python
    assert sample.labels["version"]


@BOTH_WAYS
def test_no_series_carries_created(in_files: bool) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=in_files)
    ApiMetrics(registry).write("alice", "AccessPolicy", "create")
    metrics.set_policies(["public"])
    metrics.observe(allowed_by("public"), 0.001)
    metrics.cache_event("verified", "hit")
    metrics.upstream_call("jwks", "ok")
    metrics.jwks_skipped_key("idp", "unsupported")
    metrics.reload("file", "ok")
    text = generate_latest(registry).decode()
    assert "authz_checks_total{" in text
    assert "authz_api_writes_total{" in text
    assert "_created" not in text


def test_plain_counts_expose_exactly_what_prometheus_client_would() -> None:
    plain, files = Metrics(CollectorRegistry(), in_files=False), Metrics(CollectorRegistry(), in_files=True)
    decisions = [Decision(outcome, reason) for outcome, reason in zip(Outcome, Reason, strict=False)]
    decisions += [allowed_by("public"), allowed_by("unknown")]
    # On a bucket bound, between bounds, past the last bound, and zero.
    seconds = [0.0, 0.0005, 0.0007, 0.002, 0.0999, 5.0, 7.5, 1e-9]
    for metrics in (plain, files):
        metrics.set_policies(["public", "quiet"])
    for n, (decision, latency) in enumerate(itertools.product(decisions, seconds)):
        for metrics in (plain, files):
            metrics.observe(decision, latency, protocol=("grpc", "http")[n % 2])
            metrics.cache_event(("verified", "opaque")[n % 2], ("hit", "miss", "error")[n % 3])

    def per_check(metrics: Metrics) -> list[str]:
        text = generate_latest(metrics.registry).decode()
        families = ("authz_checks", "authz_check_duration", "authz_cache_events", "authz_policy_allows")
        return [line for line in text.splitlines() if any(f in line for f in families)]

    assert per_check(plain) == per_check(files)
    assert plain.registry.get_sample_value("authz_check_duration_seconds_bucket", {"protocol": "grpc", "le": "+Inf"})
    assert plain.registry.get_sample_value("authz_policy_allows_total", {"policy": "public"}) == len(seconds)


def test_plain_counts_cannot_be_registered_twice() -> None:
    registry = CollectorRegistry()
    Metrics(registry, in_files=False)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry, in_files=False)


def test_each_metrics_owns_its_registry() -> None:
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.upstream_call("jwks", "ok")
    labels = {"endpoint": "jwks", "outcome": "ok"}
    assert first.registry.get_sample_value("authz_upstream_calls_total", labels) == 1
    assert second.registry.get_sample_value("authz_upstream_calls_total", labels) is None


def test_api_metrics_count_writes_by_writer_type_and_action() -> None:
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    metrics.write("alice", "AccessPolicy", "create")
    metrics.write("alice", "AccessPolicy", "create")
    metrics.write("ci", "User", "delete")
    metrics.allow_everything.labels("alice").inc()
    labels = {"writer": "alice", "type": "AccessPolicy", "action": "create"}
    assert registry.get_sample_value("authz_api_writes_total", labels) == 2
    assert (
        registry.get_sample_value("authz_api_writes_total", {"writer": "ci", "type": "User", "action": "delete"}) == 1
    )
    assert registry.get_sample_value("authz_api_allow_everything_writes_total", {"writer": "alice"}) == 1


# --------------------------------------------------------------------------- a supervisor's process group


def _own(name: str) -> float:
    registry = CollectorRegistry()
    Metrics(registry, in_files=False)
    value = registry.get_sample_value(name)
    assert value is not None
    return value


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process figures come from /proc")
def test_the_process_group_adds_up_its_processes() -> None:
    # A real second process holding memory and many open files stands in for a worker.
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; b = bytearray(64 << 20); fs = [open('/dev/null') for _ in range(300)]; "
            "print('ready', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        assert child.stdout.readline() == b"ready\n"
        registry = CollectorRegistry()
        ProcessGroupCollector(lambda: [child.pid], registry)
        alone = CollectorRegistry()
        ProcessGroupCollector(list, alone)
        rss, rss_alone = (r.get_sample_value("process_resident_memory_bytes") or 0 for r in (registry, alone))
        assert rss >= rss_alone + (64 << 20) * 0.9  # the child's 64 MiB are in the sum
        open_fds = registry.get_sample_value("process_open_fds") or 0
        assert open_fds >= 300  # the process with the most: the child, not our own count
        assert registry.get_sample_value("process_max_fds")
        oldest = alone.get_sample_value("process_start_time_seconds")
        assert registry.get_sample_value("process_start_time_seconds") == oldest  # this process, not the child
        assert "_created" not in generate_latest(registry).decode()
        child.stdin.close()
        child.wait(10)
    # Reaped, the child's CPU moved to RUSAGE_CHILDREN: the counter did not go back.
    before = registry.get_sample_value("process_cpu_seconds_total") or 0
    gone = CollectorRegistry()
    ProcessGroupCollector(list, gone)
    assert (gone.get_sample_value("process_cpu_seconds_total") or 0) >= before
    assert _own("process_cpu_seconds_total") <= before


def test_the_supervisor_registry_serves_files_processes_and_build(tmp_path: Path) -> None:
    registry = supervisor_registry(str(tmp_path), lambda: [os.getpid()])
    names = {family.name for family in registry.collect()}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info", "authz_build_info"} <= names
