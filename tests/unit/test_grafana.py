"""deploy/grafana/authz-service.json: loads as a dashboard, every query names a metric the service
exports, and every authz_ family (and the process figures operators watch) has a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from authz_service.metrics import Metrics
from authz_service.server.sync import StoreMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "authz-service.json"
# The suffixes Prometheus' text format adds to a family's name (counters, histograms).
SUFFIXES = ("", "_total", "_created", "_bucket", "_sum", "_count")
# Besides every authz_ family, what the dashboard must show of prometheus-client's own collectors.
SHOWN_PROCESS = {"process_cpu_seconds_total", "process_resident_memory_bytes"}
METRIC = re.compile(r"\b(?:authz|process|python)_[a-z_]+\b")


def exported() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    StoreMetrics(registry)
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES}


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_dashboard_is_json_with_panels_and_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "authz-service"
    assert dashboard["panels"]
    assert all(panel["targets"] for panel in dashboard["panels"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_names_an_exported_metric() -> None:
    names = exported()
    used = set()
    for expr in queries(json.loads(DASHBOARD.read_text())):
        found = set(METRIC.findall(expr))
        assert found, expr
        assert found <= names, (expr, found - names)
        used |= found
    # ... and every family the service exports is on the dashboard.
    families = {name for name in names if name.startswith("authz_") and not name.endswith("_created")}
    shown = {name.removesuffix(suffix) for name in used for suffix in SUFFIXES if name.endswith(suffix)}
    missing = {f for f in families if not any(f.startswith(s) for s in shown)}
    assert not missing, missing
    assert used >= SHOWN_PROCESS, SHOWN_PROCESS - used
