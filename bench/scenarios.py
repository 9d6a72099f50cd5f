"""The scenarios: what each one starts, how its answer is verified, and what it measures.

Every scenario runs the service with its shipped defaults plus the scenario's subject (its
introspector, its policies). A scenario that changes any other setting says why (`why=`), and
the report lists, per scenario, every setting that differs from the defaults.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import signal
import statistics
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import grpc
from checkreq import CHECK_PATH, check_request, frame, http_check_headers, http_check_path
from load import grpc_load, h2load, h2load_run, wrk
from procs import (
    BENCH,
    HARNESS_SETTINGS,
    HOST,
    PY,
    ROOT,
    CpuMeter,
    Proc,
    Server,
    Skip,
    free_port,
    rss_bytes,
    run_cmd,
    start_authz,
    start_echo,
    start_envoy,
    start_idp,
    start_noop,
    start_noop_http,
    tree_pids,
)

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2
from authz_service.config.model import Config
from authz_service.devstack.envoy import ENVOY_YAML, load_config, on_loopback
from authz_service.registries import validate_config

JWT_AUTHN_YAML: Final = BENCH / "envoy-jwt-authn.yaml"
ENVOY_HTTP_YAML: Final = ROOT / "envoy" / "envoy-http.yaml"  # the shipped HTTP-mode front proxy
AUDIENCE: Final = "authz-service"
FILL_ENTRIES: Final = 100_000
RSS_SCENARIO: Final = "rss-100k"


@dataclasses.dataclass(frozen=True)
class Profile:
    """How long each measurement runs."""

    name: str
    throughput_s: int  # h2load -D at 16 connections x 1 stream
    latency_s: int  # h2load -D at 1 connection x 1 stream, per-request times from --log-file
    warmup_ms: int  # h2load -D at 16 connections before the measured runs (not measured)
    uncached_s: int  # the Python load generator's run for unique opaque tokens
    envoy_s: int  # wrk -d through Envoy
    fill_timeout_s: int  # bound on filling the cache with 100k entries
    scenario_timeout_s: int  # wall clock bound on any one scenario (fill scenario: + fill_timeout_s)
    noop_rounds: int  # the no-op floors are measured this many times, spread over the run
    fill_entries: int  # distinct tokens put in the opaque cache for the RSS measurement
    sweep_s: int  # h2load -D at each point of the concurrency sweep
    overload_baseline_s: int  # the overload probe's run before the load
    overload_s: int  # the 5x open-loop load
    overload_recover_s: int  # the probe's run after the load (the recovery window)


# quick: a smoke run; the RSS fill is 10k entries, extrapolated linearly to 100k (and said so).
QUICK: Final = Profile(
    "quick",
    throughput_s=2,
    latency_s=1,
    warmup_ms=500,
    uncached_s=2,
    envoy_s=2,
    fill_timeout_s=120,
    scenario_timeout_s=60,
    noop_rounds=2,
    fill_entries=10_000,
    sweep_s=1,
    overload_baseline_s=1,
    overload_s=4,
    overload_recover_s=7,
)
FULL: Final = Profile(
    "full",
    throughput_s=10,
    latency_s=5,
    warmup_ms=2000,
    uncached_s=8,
    envoy_s=10,
    fill_timeout_s=300,
    scenario_timeout_s=120,
    noop_rounds=3,
    fill_entries=FILL_ENTRIES,
    sweep_s=3,
    overload_baseline_s=2,
    overload_s=10,
    overload_recover_s=10,
)


class ScenarioTimeout(Exception):
    """A scenario ran past its wall-clock bound."""


@dataclasses.dataclass
class Row:
    """One line of the report's table."""

    scenario: str
    what: str
    rate: float | None = None
    ratio: float | None = None
    ratio_note: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_pct: float | None = None
    cpu_us: float | None = None
    rss_mb: float | None = None
    serving_s: float | None = None
    body_bytes: int | None = None
    verified: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    status: str = "ok"
    # Settings that differ from the service's defaults beyond HARNESS_SETTINGS; None: no service ran.
    deviations: dict[str, str] | None = None
    # The floor its ratio is to, filled in at the end: "grpc" (the no-op grpc.aio server), "http"
    # (the no-op aiohttp server); "" when the scenario sets its own ratio or has none.
    floor: str = "grpc"


# --------------------------------------------------------------------------- defaults


def _shown(section: str, name: str, value: Any, raw: Mapping[str, Any]) -> str:
    if name.endswith("_port"):
        return "<free port>"
    if name.endswith("_address") and isinstance(value, str) and value.startswith(f"{HOST}:"):
        return f"{HOST}:<free port>"
    written = raw.get(section, {}).get(name, value) if isinstance(raw.get(section), Mapping) else value
    return str(written).lower() if isinstance(written, bool) else str(written)


def deviations(raw: Mapping[str, Any]) -> dict[str, str]:
    """Every setting of a config (as the service validates it) that differs from the service's defaults.

    The scenario's subject (introspectors, policies, users) has no default and is not listed;
    neither are the HARNESS_SETTINGS every start adds.
    """
    config, defaults = validate_config(raw), Config()
    found = {}
    for section in ("server", "cache", "response", "logging"):
        got, default = getattr(config, section), getattr(defaults, section)
        for field in dataclasses.fields(got):
            if not field.init:  # derived from a setting listed itself (grpc_listen from grpc_address)
                continue
            key = f"{section}.{field.name}"
            value = getattr(got, field.name)
            if key not in HARNESS_SETTINGS and value != getattr(default, field.name):
                if key == "logging.decisions":
                    value = "off" if value is None else logging.getLevelName(value).lower()
                found[key] = _shown(section, field.name, value, raw)
    return found


# --------------------------------------------------------------------------- verification


def verify_check(port: int, request: external_auth_pb2.CheckRequest, expect: tuple[int, str | None]) -> str:
    """One Check with a real gRPC client; raise unless the decision is the expected one.

    expect: (0, "allow") for an allow that must carry x-user-id; (0, None) for any OK;
    (code, label) for a deny with that CheckResponse status code and reason label."""
    code, label = expect
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        check = channel.unary_unary(
            CHECK_PATH,
            request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        reply: external_auth_pb2.CheckResponse = check(request, timeout=10)
    got = reply.status.code
    if code == 0:
        if got != 0 or not reply.HasField("ok_response"):
            raise RuntimeError(f"wrong answer: expected allow, got code {got} {reply.status.message!r}")
        if label == "allow":
            names = {option.header.key for option in reply.ok_response.headers}
            if "x-user-id" not in names:
                raise RuntimeError(f"allow without x-user-id header: {sorted(names)}")
            return "allow (x-user-id set)"
        return "OK"
    if got != code or (label is not None and reply.status.message != label):
        raise RuntimeError(f"wrong answer: expected code {code} {label or ''}, got {got} {reply.status.message!r}")
    return f"deny {got} {reply.status.message}".strip()


def _http(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            body: dict[str, Any] = json.loads(reply.read() or b"{}")
            return int(reply.status), body
    except urllib.error.HTTPError as err:
        return err.code, {}


def http_answer(url: str, headers: list[str]) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with `name: value` headers: status, headers (lower-case names), body."""
    pairs = dict(line.split(": ", 1) for line in headers)
    request = urllib.request.Request(url, headers=pairs)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status), {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def verify_http_check(url: str, allow: list[str], denials: Mapping[str, list[str]]) -> str:
    """HTTP mode answers: `allow` headers get 200 with x-user-id user-1; each denial 401."""
    status, headers, body = http_answer(url, allow)
    if status != 200 or headers.get("x-user-id") != "user-1":
        raise RuntimeError(f"wrong answer: expected 200 with x-user-id user-1, got {status} {body[:200]!r}")
    for what, denied in denials.items():
        status, headers, body = http_answer(url, denied)
        if status != 401 or "x-user-id" in headers:
            raise RuntimeError(f"wrong answer for {what}: expected 401, got {status} {body[:200]!r}")
    return "allow 200 (x-user-id user-1); 401 for " + " and ".join(denials)


# --------------------------------------------------------------------------- the run's state


class Bench:
    """One run: the shared IdP and no-op server, the rows so far, and each scenario."""

    def __init__(self, profile: Profile, workdir: Path) -> None:
        self.p = profile
        self.work = workdir
        self.rows: list[Row] = []
        self.noop_rates: list[float] = []
        self.extra: dict[str, Any] = {}
        self.serving_times: list[tuple[str, float]] = []
        self.material: dict[str, Any] = {}
        self.uncached_used = 0
        self.idp: Proc | None = None
        self.noop: Server | None = None
        self.noop_http: tuple[Proc, int] | None = None  # the HTTP floor: process, port
        self.noop_http_rates: list[float] = []
        self.noop_granian: tuple[Proc, int] | None = None  # granian's no-op floor: process, port
        self.noop_granian_rates: list[float] = []
        self.granian_rows: set[str] = set()  # HTTP-mode rows served by granian (also noted vs its floor)

    def start_idp(self, opaque: int) -> None:
        self.idp, self.material = start_idp(self.work, opaque)

    def token(self, name: str) -> str:
        return str(self.material["tokens"][name])

    def body_file(self, name: str, request: external_auth_pb2.CheckRequest) -> Path:
        path = self.work / f"{name}.bin"
        path.write_bytes(frame(request.SerializeToString()))
        return path

    # -- configs: the scenario's subject; everything else is the service's default ----------

    def _jwt(self, **jwt: Any) -> dict[str, Any]:
        return {"iss": self.material["issuer"], "aud": AUDIENCE, **jwt}

    # The token scenarios run authentication-only (every valid token allowed), declared as a user
    # must declare it; the policy scenarios replace the declaration with their policies.
    def cfg_hs256(self) -> dict[str, Any]:
        return {
            "authentication_only": True,
            "introspectors": [{"id": "bench", "type": "jwt", "jwt": self._jwt(secret=self.material["hmac_secret"])}],
        }

    def cfg_jwks(self, workers: int = 1) -> dict[str, Any]:
        introspector = {"id": "bench", "type": "jwt", "jwks_uri": self.material["jwks_uri"], "cache_ttl": 3600}
        config: dict[str, Any] = {"authentication_only": True, "introspectors": [{**introspector, "jwt": self._jwt()}]}
        if workers != 1:
            config["server"] = {"workers": workers}
        return config

    def cfg_static(self, alg: str) -> dict[str, Any]:
        kty = {"RS256": "RSA", "ES256": "EC"}[alg]
        key = {"kty": kty, "alg": alg, "format": "PEM", "pub": self.material["pem"][alg]}
        return {
            "authentication_only": True,
            "introspectors": [{"id": "bench", "type": "jwt", "jwt": self._jwt(keys=[key])}],
        }

    def cfg_opaque(self) -> dict[str, Any]:
        endpoint = {
            "url": self.material["introspection_url"],
            "authorization": self.material["introspection_authorization"],
        }
        return {
            "authentication_only": True,
            "introspectors": [{"id": "bench", "type": "opaque", "cache_ttl": 3600, "introspection_endpoint": endpoint}],
        }

    def cfg_matcho(self) -> dict[str, Any]:
        config = self.cfg_hs256()
        del config["authentication_only"]
        config["policies"] = [
            {
                "id": "admins",
                "engine": "matcho",
                "matcho": {"uri": "#^/admin(/|$)", "jwt": {"roles": {"$contains": "admin"}}},
            },
            {
                "id": "readers",
                "engine": "matcho",
                "matcho": {
                    "request-method": {"$enum": ["get", "head"]},
                    "uri": "#^/api/(Patient|Observation)/",
                    "jwt": {"sub": "present?", "roles": {"$contains": "reader"}, "email": "#@example\\.com$"},
                    "introspector": "bench",
                },
            },
        ]
        return config

    # -- starting the service -----------------------------------------------------------------

    def start_service(self, row: Row, config: dict[str, Any], why: str | None = None, *, http: bool = False) -> Server:
        """start_authz, recorded in the row; a config off the defaults must come with a reason."""
        server = start_authz(row.scenario, config, self.work, http=http)
        row.deviations = deviations(server.config)
        if row.deviations and not why:
            server.proc.stop()
            listed = ", ".join(f"{k} {v}" for k, v in row.deviations.items())
            raise RuntimeError(f"the config differs from the shipped defaults ({listed}) and the scenario says not why")
        if why:
            row.what += f" [not the defaults: {why}]"
        row.serving_s = server.serving_s
        self.serving_times.append((row.scenario, server.serving_s))
        return server

    # -- measurement core ---------------------------------------------------------------------

    def measure_h2(self, row: Row, server: Server, body: Path) -> None:
        h2load(server.port, body, 16, f"{self.p.warmup_ms}ms")
        with CpuMeter(server.proc.pid) as cpu:
            result = h2load(server.port, body, 16, self.p.throughput_s)
        row.rate = result.rate
        row.cpu_pct = cpu.percent
        row.cpu_us = 1e6 * cpu.seconds / max(1, result.done)
        row.rss_mb = rss_bytes(tree_pids(server.proc.pid)) / 2**20
        if server.processes > 1:
            # How evenly SO_REUSEPORT spread the connections shows in each process's CPU.
            busy = sorted((100 * sec / cpu.wall for sec in cpu.per_pid.values()), reverse=True)
            row.notes.append("CPU % of the busy processes: " + " / ".join(f"{b:.0f}" for b in busy if b >= 1))
        lat = h2load(server.port, body, 1, self.p.latency_s, log_file=self.work / f"{row.scenario}.lat.tsv")
        row.p50_ms, row.p99_ms = lat.p50_ms, lat.p99_ms
        row.body_bytes = body.stat().st_size

    def measure_http(self, row: Row, pid: int, url: str, headers: list[str]) -> None:
        """h2load --h1 (HTTP/1.1 keep-alive) at 16 connections for checks/s and CPU, at 1 for p50/p99."""
        h2load_run(url, connections=16, duration=f"{self.p.warmup_ms}ms", h1=True, headers=headers)
        with CpuMeter(pid) as cpu:
            result = h2load_run(url, connections=16, duration=self.p.throughput_s, h1=True, headers=headers)
        row.rate = result.rate
        row.cpu_pct = cpu.percent
        row.cpu_us = 1e6 * cpu.seconds / max(1, result.done)
        row.rss_mb = rss_bytes(tree_pids(pid)) / 2**20
        lat = h2load_run(
            url,
            connections=1,
            duration=self.p.latency_s,
            h1=True,
            headers=headers,
            log_file=self.work / f"{row.scenario}.lat.tsv",
        )
        row.p50_ms, row.p99_ms = lat.p50_ms, lat.p99_ms

    def start_noop_http(self) -> tuple[Proc, int]:
        """The HTTP floor, started once and kept for the run."""
        if self.noop_http is None:
            self.noop_http = start_noop_http(self.work)
        return self.noop_http

    def authz_scenario(
        self,
        row: Row,
        config: dict[str, Any],
        token: str | None,
        expect: tuple[int, str | None] = (0, "allow"),
        why: str | None = None,
    ) -> Row:
        """Start the service on config, verify one Check, then measure with h2load."""
        server = self.start_service(row, config, why)
        try:
            request = check_request(token)
            row.verified = verify_check(server.port, request, expect)
            if server.processes > 1:
                row.notes.append(
                    f"{server.processes} workers SERVING, h2load on the shared SO_REUSEPORT port "
                    "(the kernel spreads the 16 connections)"
                )
            self.measure_h2(row, server, self.body_file(row.scenario, request))
        finally:
            server.proc.stop()
        return row

    # -- gRPC scenarios -------------------------------------------------------------------------

    def s_noop(self) -> Row:
        round_ = len(self.noop_rates) + 1
        row = Row("noop" if round_ == 1 else f"noop #{round_}", "no-op grpc.aio Check server (the floor)")
        server = self.noop or start_noop(self.work)
        self.noop = server
        row.serving_s = server.serving_s
        request = check_request(self.token("es256"))
        row.verified = verify_check(server.port, request, (0, None))
        self.measure_h2(row, server, self.body_file("noop", request))
        if round_ > 1:
            row.what = "no-op again (the floor is the median of all no-op rounds)"
        assert row.rate is not None
        self.noop_rates.append(row.rate)
        return row

    def s_hs256(self) -> Row:
        return self.authz_scenario(Row("hs256", "JWT HS256, jwt.secret"), self.cfg_hs256(), self.token("hs256"))

    def s_rs256_jwks(self) -> Row:
        row = Row("rs256-jwks", "JWT RS256 via JWKS (keys cached)")
        return self.authz_scenario(row, self.cfg_jwks(), self.token("rs256"))

    def s_es256_jwks(self) -> Row:
        row = Row("es256-jwks", "JWT ES256 via JWKS, one token repeated, workers 1")
        self.authz_scenario(row, self.cfg_jwks(), self.token("es256"))
        self.extra["es256_w1"] = row.rate
        return row

    def s_es256_decisions_off(self) -> Row:
        row = Row("es256-decisions-off", "es256-jwks without the decision log line")
        config = self.cfg_jwks()
        config["logging"] = {"decisions": "off"}
        self.authz_scenario(
            row, config, self.token("es256"), why="decisions off, to show what the decision log line costs"
        )
        self._note_ratio(row, "es256_w1", "es256-jwks (decision log at info, the default)")
        return row

    def s_es256_w2(self) -> Row:
        row = Row("es256-w2", "JWT ES256 via JWKS, workers 2")
        why = "workers 2 (default 1) to measure two serving processes; worker_base_port to health-check each"
        self.authz_scenario(row, self.cfg_jwks(2), self.token("es256"), why=why)
        ratio = self._note_ratio(row, "es256_w1", "workers 1 (es256-jwks)")
        if ratio is not None:
            self.extra["w2_over_w1"] = ratio
        return row

    def _note_ratio(self, row: Row, baseline: str, label: str) -> float | None:
        """The row's checks/s over the rate an earlier scenario of this run kept as `baseline` in
        `extra`, noted on the row ("1.09x <label>"); None when either is missing."""
        base = self.extra.get(baseline)
        if not base or not row.rate:
            return None
        ratio: float = row.rate / base
        row.notes.append(f"{ratio:.2f}x {label}")
        return ratio

    def s_rs256_static(self) -> Row:
        row = Row("rs256-static", "JWT RS256, static PEM key (jwt.keys)")
        return self.authz_scenario(row, self.cfg_static("RS256"), self.token("rs256"))

    def s_es256_static(self) -> Row:
        row = Row("es256-static", "JWT ES256, static PEM key (jwt.keys)")
        return self.authz_scenario(row, self.cfg_static("ES256"), self.token("es256"))

    def s_opaque_cached(self) -> Row:
        row = Row("opaque-cached", "opaque token, one token, cached (warm)")
        return self.authz_scenario(row, self.cfg_opaque(), self.token("opaque"))

    def s_deny_bad_signature(self) -> Row:
        row = Row("deny-bad-signature", "deny: ES256 signed by a foreign key (JWKS)")
        return self.authz_scenario(row, self.cfg_jwks(), self.token("es256_bad_signature"), (16, "bad_signature"))

    def s_deny_missing_token(self) -> Row:
        row = Row("deny-missing-token", "deny: no Authorization header")
        return self.authz_scenario(row, self.cfg_jwks(), None, (16, "missing_token"))

    def s_hs256_matcho(self) -> Row:
        row = Row("hs256-matcho", "JWT HS256 + 2 matcho policies (2nd one allows)")
        self.authz_scenario(row, self.cfg_matcho(), self.token("hs256_reader"))
        self.extra["hs256_matcho"] = row.rate
        return row

    def s_hs256_matcho_dry_run(self) -> Row:
        """Issue 23's target: one dry-run policy costs the allow path under 10% (run it right
        after hs256-matcho, whose rate it is compared with)."""
        row = Row(
            "hs256-matcho-dry-run",
            "hs256-matcho + 1 dry-run matcho policy (3 conditions, one a regex; it would deny)",
        )
        config = self.cfg_matcho()
        config["policies"].append(
            {
                "id": "practitioners-read",
                "mode": "dry-run",
                "engine": "matcho",
                "matcho": {
                    "uri": "#^/api/(Patient|Observation)/",
                    "request-method": {"$enum": ["get", "head"]},
                    "jwt": {"roles": {"$contains": "practitioner"}},
                },
            }
        )
        self.authz_scenario(row, config, self.token("hs256_reader"))
        ratio = self._note_ratio(row, "hs256_matcho", "hs256-matcho (the same without the dry-run policy)")
        if ratio is not None:
            row.notes.append(f"dry-run cost on the allow path: {100 * (1 - ratio):.1f}% of throughput")
        return row

    # -- HTTP mode (server.http_address) --------------------------------------------------------

    def s_noop_http(self) -> Row:
        """The HTTP floor: bench/noop_http_server.py, the same requests as the HTTP scenarios."""
        round_ = len(self.noop_http_rates) + 1
        row = Row(
            "noop-http" if round_ == 1 else f"noop-http #{round_}",
            "no-op aiohttp server on uvloop, HTTP/1.1 (the HTTP floor)",
            floor="http",
        )
        if round_ > 1:
            row.what = "no-op aiohttp again (the HTTP floor is the median of all its rounds)"
        return self._noop_http_round(row, self.start_noop_http(), self.noop_http_rates)

    def s_noop_http_granian(self) -> Row:
        """granian's floor: bench/noop_http_server.py --engine granian, the same requests."""
        round_ = len(self.noop_granian_rates) + 1
        row = Row(
            "noop-http-granian" if round_ == 1 else f"noop-http-granian #{round_}",
            "no-op granian (ASGI, embedded on uvloop), HTTP/1.1 (granian's floor)",
            floor="http",
        )
        return self._noop_http_round(row, self.start_noop_granian(), self.noop_granian_rates)

    def start_noop_granian(self) -> tuple[Proc, int]:
        """granian's HTTP floor, started once and kept for the run."""
        if self.noop_granian is None:
            self.noop_granian = start_noop_http(self.work, "noop-http-granian", "granian")
        return self.noop_granian

    def _noop_http_round(self, row: Row, noop: tuple[Proc, int], rates: list[float]) -> Row:
        """One round of an HTTP floor: verified (200), measured like the HTTP scenarios, its rate kept."""
        proc, port = noop
        url = f"http://{HOST}:{port}{http_check_path('forward_auth')}"
        headers = http_check_headers(self.token("es256"), "forward_auth")
        status, _, _ = http_answer(url, headers)
        if status != 200:
            raise RuntimeError(f"{row.scenario}: the no-op HTTP server answered {status}")
        row.verified = "OK (200)"
        self.measure_http(row, proc.pid, url, headers)
        assert row.rate is not None
        rates.append(row.rate)
        return row

    def _http_mode(self, row: Row, mode: str, *, decisions: bool = True, engine: str = "granian") -> Row:
        """The service at its defaults plus server.http_address, an ES256 JWT (keys from JWKS,
        one token repeated: the verified-token cache), measured like the HTTP floor."""
        why = "server.http_address set: HTTP mode (off by default) is what this scenario measures"
        config = self.cfg_jwks()
        if not decisions:
            config["logging"] = {"decisions": "off"}
            why += "; decisions off, to show what the decision log line costs in HTTP mode"
        if engine != "granian":
            config.setdefault("server", {})["http_engine"] = engine
            why += f"; server.http_engine {engine}, the other HTTP server"
        else:
            self.granian_rows.add(row.scenario)
        server = self.start_service(row, config, why, http=True)
        try:
            url = f"http://{HOST}:{server.http_port}{http_check_path(mode)}"
            headers = http_check_headers(self.token("es256"), mode)
            row.verified = verify_http_check(
                url,
                headers,
                {
                    "a bad signature": http_check_headers(self.token("es256_bad_signature"), mode),
                    "no token": http_check_headers(None, mode),
                },
            )
            self.measure_http(row, server.proc.pid, url, headers)
            row.notes.append(f"h2load --h1 to {http_check_path(mode)}, {len(headers)} request headers")
        finally:
            server.proc.stop()
        return row

    def s_http_forward_auth(self) -> Row:
        row = Row(
            "http-forward-auth-es256",
            "HTTP mode, /forward_auth (nginx, Traefik), JWT ES256 via JWKS, one token repeated",
            floor="http",
        )
        self._http_mode(row, "forward_auth")
        self.extra["http_forward_auth"] = row.rate
        return row

    def s_http_forward_auth_decisions_off(self) -> Row:
        row = Row(
            "http-forward-auth-decisions-off",
            "http-forward-auth-es256 without the decision log line",
            floor="http",
        )
        self._http_mode(row, "forward_auth", decisions=False)
        self._note_ratio(row, "http_forward_auth", "http-forward-auth-es256 (decision log at info, the default)")
        return row

    def s_http_forward_auth_aiohttp(self) -> Row:
        row = Row(
            "http-forward-auth-es256-aiohttp",
            "http-forward-auth-es256 served by aiohttp (server.http_engine: aiohttp)",
            floor="http",
        )
        self._http_mode(row, "forward_auth", engine="aiohttp")
        self._note_ratio(row, "http_forward_auth", "http-forward-auth-es256 (granian, the default)")
        return row

    def s_http_ext_authz(self) -> Row:
        row = Row(
            "http-ext-authz-es256",
            "HTTP mode, /ext_authz/<path> (Envoy http_service), JWT ES256 via JWKS, one token repeated",
            floor="http",
        )
        return self._http_mode(row, "ext_authz")

    # -- the decision log's cost on the loop --------------------------------------------------

    def s_decision_log(self) -> Row:
        """bench/micro_decision_log.py: log_decision's cost per Check with the writer thread running."""
        row = Row("decision-log", "decision log line per Check, writer thread running (microbenchmark)", floor="")
        rounds = 3 if self.p.name == "quick" else 7
        done = run_cmd([PY, str(BENCH / "micro_decision_log.py"), "--rounds", str(rounds)], timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"micro_decision_log.py failed:\n{done.stderr[-1500:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        self.extra["decision_log"] = result
        row.verified = f"{result['lines_written']:,} lines written, {result['dropped']} dropped"
        row.notes.append(
            f"on the loop: {result['call_us']:.2f} µs CPU per call (log_decision builds a tuple and enqueues it); "
            f"writer thread: {result['writer_us']:.2f} µs CPU per line (format + write to /dev/null); "
            f"at most {result['total_us']:.2f} µs per Check if all the writer's GIL time came out of the loop's; "
            f"medians of {rounds} rounds of {result['calls_per_round']:,} calls"
        )
        return row

    def s_opaque_uncached(self) -> Row:
        """Every Check carries a token never seen before: one introspection call to the IdP each.

        h2load repeats one body, so this uses bench/grpc_load.py (grpc.aio, 16 in flight over 4
        connections); its ratio is to the no-op server driven by the same client, in the same scenario."""
        row = Row("opaque-uncached", "opaque token, unique per Check (introspection each time)")
        pool = Path(self.material["opaque_pool"])
        pool_size = int(self.material["opaque_pool_size"])

        def remaining() -> int:
            # Tokens [0, fill_entries) are the cache fill's; the rest are used once each here.
            return pool_size - self.p.fill_entries - self.uncached_used

        if remaining() < 100:
            raise Skip("skipped: opaque token pool used up")
        noop = self.noop or start_noop(self.work)
        self.noop = noop
        base = grpc_load(
            noop.port, token=self.token("opaque"), count=10**6, concurrency=16, channels=4, duration=self.p.uncached_s
        )
        server = self.start_service(row, self.cfg_opaque())
        try:
            skip = self.p.fill_entries + self.uncached_used
            first = pool.read_text().split("\n", skip + 1)[skip]
            row.verified = verify_check(server.port, check_request(first), (0, "allow"))
            self.uncached_used += 1
            with CpuMeter(server.proc.pid) as cpu:
                load = grpc_load(
                    server.port,
                    tokens=pool,
                    skip=self.p.fill_entries + self.uncached_used,
                    count=min(remaining(), 20_000),
                    concurrency=16,
                    channels=4,
                    duration=self.p.uncached_s,
                )
            self.uncached_used += load.sent
            if load.ok != load.done or load.errors:
                raise RuntimeError(f"uncached answers were not all allow: {load}")
            row.rate = load.rate
            row.ratio = load.rate / base.rate
            row.ratio_note = "vs no-op with the same Python client"
            row.cpu_pct = cpu.percent
            row.cpu_us = 1e6 * cpu.seconds / max(1, load.done)
            row.rss_mb = rss_bytes(tree_pids(server.proc.pid)) / 2**20
            if remaining() > 0:
                lat = grpc_load(
                    server.port,
                    tokens=pool,
                    skip=self.p.fill_entries + self.uncached_used,
                    count=min(remaining(), 5_000),
                    concurrency=1,
                    channels=1,
                    duration=self.p.latency_s,
                )
                self.uncached_used += lat.sent
                row.p50_ms, row.p99_ms = lat.p50_ms, lat.p99_ms
            row.notes.append(
                f"client: bench/grpc_load.py (16 in flight, 4 connections); the same client against the "
                f"no-op: {base.rate:,.0f}/s; p50/p99 from the same client at 1 in flight (includes "
                f"the Python client's own time)"
            )
        finally:
            server.proc.stop()
        return row

    def s_rss_100k(self) -> Row:
        """Fill the opaque cache with distinct tokens (the uncached path), ask every token once more
        (cache hits), and read VmRSS."""
        entries = self.p.fill_entries
        row = Row(
            RSS_SCENARIO,
            f"RSS with {entries // 1000}k cached opaque entries, each a user of its own (filled via the uncached "
            "path, then each asked again)",
            floor="",
        )
        pool = Path(self.material["opaque_pool"])
        config, why = self.cfg_opaque(), None
        if Config().cache.max_entries < FILL_ENTRIES:
            config["cache"] = {"max_entries": FILL_ENTRIES}
            why = f"cache.max_entries {FILL_ENTRIES} so that {FILL_ENTRIES:,} entries fit"
        server = self.start_service(row, config, why)
        try:
            first = pool.read_text().split("\n", 1)[0]
            row.verified = verify_check(server.port, check_request(first), (0, "allow"))
            before = rss_bytes(tree_pids(server.proc.pid))
            with CpuMeter(server.proc.pid) as cpu:
                fill = grpc_load(
                    server.port,
                    tokens=pool,
                    skip=1,
                    count=entries - 1,
                    concurrency=32,
                    channels=4,
                    duration=self.p.fill_timeout_s,
                )
            filled = fill.ok + 1
            after = rss_bytes(tree_pids(server.proc.pid))
            # Re-ask for the most recent 1000: all must be cache hits (no IdP call).
            hits_before = self._cache_events(server, "hit")
            check = grpc_load(
                server.port, tokens=pool, skip=filled - 1000, count=1000, concurrency=16, channels=2, duration=60
            )
            hits = self._cache_events(server, "hit") - hits_before
            misses = self._cache_events(server, "miss") / 2  # each new token misses both caches
            if check.ok != 1000 or hits < 1000:
                raise RuntimeError(f"the filled cache did not answer from memory: {check}, {hits:.0f} hits")
            # Then every user comes back once, as in service: each hit moves its entry to the LRU's
            # newest end, and that churn is what sizes the cache's table. RSS after it is the figure.
            hits_before = self._cache_events(server, "hit")
            again = grpc_load(
                server.port,
                tokens=pool,
                skip=0,
                count=filled,
                concurrency=32,
                channels=4,
                duration=self.p.fill_timeout_s,
            )
            rehits = self._cache_events(server, "hit") - hits_before
            if again.ok != filled or rehits < filled:
                raise RuntimeError(f"the re-asked cache did not answer from memory: {again}, {rehits:.0f} hits")
            steady = rss_bytes(tree_pids(server.proc.pid))
            per_entry = (steady - before) / max(1, filled)
            row.rate = fill.rate
            row.rss_mb = steady / 2**20
            row.cpu_us = 1e6 * cpu.seconds / max(1, fill.ok)
            row.cpu_pct = cpu.percent
            row.notes.append(
                f"checks/s = fill rate (unique tokens, 32 in flight); filled {filled:,} entries in "
                f"{fill.seconds:.0f} s; RSS before fill {before / 2**20:.1f} MB, after it {after / 2**20:.1f} MB; "
                f"re-check of the last 1000: {check.ok} allow, {hits:.0f} cache hits; then all {filled:,} asked "
                f"again ({again.ok:,} allow, {rehits:,.0f} hits): RSS {steady / 2**20:.1f} MB, "
                f"+{per_entry:,.0f} B/entry; {misses:,.0f} misses in all"
            )
            self.extra["rss_filled"] = filled
            self.extra["rss_per_entry"] = per_entry
            self.extra["rss_before_mb"] = before / 2**20
            self.extra["rss_filled_mb"] = after / 2**20
            if filled >= FILL_ENTRIES:
                self.extra["rss_100k_mb"] = row.rss_mb
            else:
                estimate = (before + per_entry * FILL_ENTRIES) / 2**20
                self.extra["rss_100k_mb"] = estimate
                self.extra["rss_100k_estimated"] = True
                row.notes.append(
                    f"at {FILL_ENTRIES:,} entries: ~{estimate:.0f} MB by linear extrapolation, an overstatement "
                    "(fixed costs of the allocator and the dicts' growth weigh more at 10k); only the full run's "
                    "100k fill counts"
                )
        finally:
            server.proc.stop()
        return row

    def _cache_events(self, server: Server, event: str) -> float:
        with urllib.request.urlopen(f"http://{HOST}:{server.admin_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            # A repeated token is answered by the verified-token cache ("verified") in front of the
            # opaque introspector's own cache ("bench"); either one is "from memory".
            in_memory = 'cache="bench"' in line or 'cache="verified"' in line
            if line.startswith("authz_cache_events_total{") and f'event="{event}"' in line and in_memory:
                total += float(line.rsplit(" ", 1)[1])
        return total

    # -- through Envoy (authz_service.devstack.envoy, the demo's and the e2e tests' launcher) --

    def verify_envoy(self, url: str) -> str:
        status, echo = _http(url, self.token("es256"))
        user = echo.get("headers", {}).get("x-user-id")
        if status != 200 or user != ["user-1"]:
            raise RuntimeError(f"through Envoy, a valid ES256 token got {status}, x-user-id {user}")
        claims = echo.get("headers", {}).get("x-auth-claims", [""])[0]
        if json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4))).get("sub") != "user-1":
            raise RuntimeError("through Envoy, x-auth-claims did not carry the claims")
        for bad, what in ((None, "no token"), (self.token("es256_bad_signature"), "a bad signature")):
            status, _ = _http(url, bad)
            if status != 401:
                raise RuntimeError(f"through Envoy, {what} got {status}, not 401")
        return "allow 200 (x-user-id, x-auth-claims); 401 without token and with bad signature"

    def _envoy_measure(self, row: Row, url: str, cpu_root: int, others: dict[str, int]) -> None:
        token = self.token("es256")
        wrk(url, 16, 1, token)  # warm-up (Envoy's upstream connections, the processes' first requests)
        meters = {name: CpuMeter(pid) for name, pid in {"main": cpu_root, **others}.items()}
        for meter in meters.values():
            meter.__enter__()
        result = wrk(url, 16, self.p.envoy_s, token)
        for meter in meters.values():
            meter.__exit__()
        row.rate = result.rate
        row.cpu_pct = meters["main"].percent
        row.cpu_us = 1e6 * meters["main"].seconds / max(1, result.done)
        row.rss_mb = rss_bytes(tree_pids(cpu_root)) / 2**20
        row.notes.append(f"at 16 connections p50 {result.p50_ms:.2f} / p99 {result.p99_ms:.2f} ms")
        row.notes.append(
            "CPU/check: "
            + ", ".join(
                f"{name} {1e6 * meter.seconds / max(1, result.done):.0f} us"
                for name, meter in meters.items()
                if name != "main"
            )
        )
        lat = wrk(url, 1, self.p.latency_s, token)
        row.p50_ms, row.p99_ms = lat.p50_ms, lat.p99_ms

    def s_envoy_ext_authz(self) -> Row:
        return self._envoy_ext_authz("envoy-ext-authz", 1)

    def s_envoy_ext_authz_w2(self) -> Row:
        return self._envoy_ext_authz("envoy-ext-authz-w2", 2)

    def _envoy_ext_authz(self, name: str, workers: int) -> Row:
        row = Row(name, "wrk -> Envoy (shipped envoy.yaml) -> ext_authz (ES256 JWKS) -> echo", floor="")
        why = None
        if workers > 1:
            why = (
                f"workers {workers} (default 1); each worker's port (worker_base_port + i) an endpoint of the "
                "authz cluster, since Envoy holds one connection per worker thread per host"
            )
        echo, echo_port = start_echo(self.work, f"echo-{name}")
        procs: list[Proc] = [echo]
        try:
            authz = self.start_service(row, self.cfg_jwks(workers), why)
            procs.append(authz.proc)
            authz_ports = authz.worker_ports or [authz.port]
            self._through_envoy(row, ENVOY_YAML, "authz", authz_ports, authz.proc, echo, echo_port, procs)
        finally:
            for proc in reversed(procs):
                proc.stop()
        return row

    def _through_envoy(
        self,
        row: Row,
        envoy_yaml: Path,
        cluster: str,
        ports: list[int],
        authz: Proc,
        echo: Proc,
        echo_port: int,
        procs: list[Proc],
    ) -> None:
        """Start the shipped Envoy config on loopback in front of the service (its `cluster` on
        `ports`) and the echo upstream, verify it, measure it; the Envoy joins `procs`."""
        listener = free_port()
        config = on_loopback(
            load_config(envoy_yaml),
            listener=listener,
            admin=free_port(),
            clusters={cluster: ports, "upstream": echo_port},
        )
        envoy = start_envoy(row.scenario, config, self.work, {cluster: len(ports)})
        procs.append(envoy)
        url = f"http://{HOST}:{listener}/api/Patient/pt-1"
        row.verified = self.verify_envoy(url)
        self._envoy_measure(row, url, authz.pid, {"envoy": envoy.pid, "authz": authz.pid, "echo": echo.pid})
        row.notes.insert(0, "CPU%/RSS: authz-service")
        self.extra[row.scenario] = row.rate

    def s_envoy_http_ext_authz(self, engine: str = "granian") -> Row:
        """wrk -> Envoy (shipped envoy-http.yaml, http_service) -> the service's HTTP mode -> echo."""
        name = "envoy-http-ext-authz" + ("" if engine == "granian" else f"-{engine}")
        row = Row(
            name,
            f"wrk -> Envoy (shipped envoy-http.yaml) -> HTTP ext_authz on {engine} (ES256 JWKS) -> echo",
            floor="",
        )
        why = "server.http_address set: Envoy's http_service asks the service's HTTP mode"
        config = self.cfg_jwks()
        if engine != "granian":
            config.setdefault("server", {})["http_engine"] = engine
            why += f"; server.http_engine {engine}, the other HTTP server"
        echo, echo_port = start_echo(self.work, f"echo-{name}")
        procs: list[Proc] = [echo]
        try:
            authz = self.start_service(row, config, why, http=True)
            procs.append(authz.proc)
            assert authz.http_port is not None
            self._through_envoy(
                row, ENVOY_HTTP_YAML, "authz_http", [authz.http_port], authz.proc, echo, echo_port, procs
            )
        finally:
            for proc in reversed(procs):
                proc.stop()
        return row

    def jwt_authn_config(self, listener: int, echo_port: int) -> dict[str, Any]:
        """bench/envoy-jwt-authn.yaml on loopback, with the IdP's issuer and JWKS inline."""
        config = on_loopback(
            load_config(JWT_AUTHN_YAML), listener=listener, admin=free_port(), clusters={"upstream": echo_port}
        )
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        (jwt_filter,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn"]
        provider = jwt_filter["typed_config"]["providers"]["idp"]
        provider["issuer"] = self.material["issuer"]
        provider["local_jwks"] = {"inline_string": json.dumps(self.material["jwks"])}
        return config

    def s_envoy_jwt_authn(self) -> Row:
        row = Row("envoy-jwt-authn", "wrk -> Envoy jwt_authn (same ES256 key, local_jwks) -> echo", floor="")
        echo, echo_port = start_echo(self.work, "echo-envoy-jwt-authn")
        procs: list[Proc] = [echo]
        try:
            listener = free_port()
            envoy = start_envoy("envoy-jwt-authn", self.jwt_authn_config(listener, echo_port), self.work, {})
            procs.append(envoy)
            url = f"http://{HOST}:{listener}/api/Patient/pt-1"
            row.verified = self.verify_envoy(url)
            self._envoy_measure(row, url, envoy.pid, {"envoy": envoy.pid, "echo": echo.pid})
            row.notes.insert(0, "CPU%/RSS: Envoy")
            self.extra["envoy-jwt-authn"] = row.rate
        finally:
            for proc in reversed(procs):
                proc.stop()
        return row

    def _envoy_ratio(self) -> None:
        native = self.extra.get("envoy-jwt-authn")
        w1, w2 = self.extra.get("envoy-ext-authz"), self.extra.get("envoy-ext-authz-w2")
        http = self.extra.get("envoy-http-ext-authz")
        if w1 and w2:
            self.extra["envoy_w2_over_w1"] = w2 / w1
        if native:
            if w1:
                self.extra["envoy_ratio"] = w1 / native
            if http:
                self.extra["envoy_http_ratio"] = http / native
            for row in self.rows:
                if row.scenario.startswith("envoy-") and row.scenario != "envoy-jwt-authn" and row.rate:
                    row.ratio, row.ratio_note = row.rate / native, "vs Envoy jwt_authn"

    # -- running --------------------------------------------------------------------------------

    def run_one(self, name: str, scenario: Callable[[Bench], Row], limit: int) -> Row:
        """Run one scenario within its wall-clock bound (seconds); a failure or a skip becomes its row."""

        def on_alarm(signum: int, frame: object) -> None:
            raise ScenarioTimeout(f"timed out after {limit} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(limit)
        try:
            row = scenario(self)
        except Skip as err:
            row = Row(name, "", status=str(err))
        except Exception as err:
            message = str(err).strip().splitlines()
            row = Row(name, "", status=f"failed: {message[0] if message else type(err).__name__}")
            (self.work / f"{name}.error.txt").write_text(str(err))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        self.rows.append(row)
        if name.startswith("envoy-"):
            self._envoy_ratio()
        return row

    def finish_ratios(self) -> None:
        """Each row's ratio to the median of its floor's rounds (gRPC no-op or HTTP no-op): one slow or
        fast round among three (this machine's noise is +-15%) must not move every ratio."""
        floors = {"grpc": self.noop_rates, "http": self.noop_http_rates, "http_granian": self.noop_granian_rates}
        for kind, rates in floors.items():
            if rates:
                self.extra[f"{kind}_floor"] = statistics.median(rates)
        self.extra["noop_floor"] = self.extra.get("grpc_floor")
        for row in self.rows:
            floor = self.extra.get(f"{row.floor}_floor") if row.floor else None
            if row.rate is not None and row.ratio is None and floor:
                row.ratio = row.rate / floor
                if row.floor == "http":
                    row.ratio_note = "vs no-op aiohttp"
        granian = self.extra.get("http_granian_floor")
        for row in self.rows:
            if granian and row.rate is not None and row.scenario in self.granian_rows:
                row.notes.append(f"{row.rate / granian:.2f}x the no-op granian")
