"""Every scenario by name, how long each may take, and the order a run takes them in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from overload import s_overload, s_overload_http
from scenarios import RSS_SCENARIO, Bench, Profile, Row
from sweep import s_sweep, time_bound

SCENARIOS: Final[dict[str, Callable[[Bench], Row]]] = {
    "noop": Bench.s_noop,
    "noop-http": Bench.s_noop_http,
    "noop-http-granian": Bench.s_noop_http_granian,
    "hs256": Bench.s_hs256,
    "rs256-jwks": Bench.s_rs256_jwks,
    "es256-jwks": Bench.s_es256_jwks,
    "es256-decisions-off": Bench.s_es256_decisions_off,
    "es256-w2": Bench.s_es256_w2,
    "rs256-static": Bench.s_rs256_static,
    "es256-static": Bench.s_es256_static,
    "opaque-cached": Bench.s_opaque_cached,
    "opaque-uncached": Bench.s_opaque_uncached,
    "deny-bad-signature": Bench.s_deny_bad_signature,
    "deny-missing-token": Bench.s_deny_missing_token,
    "hs256-matcho": Bench.s_hs256_matcho,
    "hs256-matcho-dry-run": Bench.s_hs256_matcho_dry_run,
    "http-forward-auth-es256": Bench.s_http_forward_auth,
    "http-forward-auth-decisions-off": Bench.s_http_forward_auth_decisions_off,
    "http-forward-auth-es256-aiohttp": Bench.s_http_forward_auth_aiohttp,
    "http-ext-authz-es256": Bench.s_http_ext_authz,
    "envoy-ext-authz": Bench.s_envoy_ext_authz,
    "envoy-ext-authz-w2": Bench.s_envoy_ext_authz_w2,
    "envoy-http-ext-authz": Bench.s_envoy_http_ext_authz,
    "envoy-http-ext-authz-aiohttp": lambda bench: bench.s_envoy_http_ext_authz("aiohttp"),
    "envoy-jwt-authn": Bench.s_envoy_jwt_authn,
    "decision-log": Bench.s_decision_log,
    "overload-5x": lambda bench: s_overload(bench, "overload-5x"),
    "overload-5x-limit256": lambda bench: s_overload(bench, "overload-5x-limit256", 256),
    "overload-5x-http": lambda bench: s_overload_http(bench, "overload-5x-http"),
    "sweep": s_sweep,
    RSS_SCENARIO: Bench.s_rss_100k,
}

# The floors: measured first and again between the other scenarios (the VM's speed drifts);
# ratios use the median of their rounds. The HTTP floor only when an HTTP scenario needs it.
FLOORS: Final = ("noop", "noop-http", "noop-http-granian")
HTTP_FLOOR_USERS: Final = frozenset(
    {
        "noop-http",
        "noop-http-granian",
        "http-forward-auth-es256",
        "http-forward-auth-decisions-off",
        "http-forward-auth-es256-aiohttp",
        "http-ext-authz-es256",
    }
)


def time_limit(name: str, profile: Profile) -> int:
    """Wall-clock seconds scenario `name` may take before it is stopped and reported as timed out."""
    limit = profile.scenario_timeout_s
    if name == RSS_SCENARIO:
        limit += profile.fill_timeout_s
    elif name == "sweep":
        limit = max(limit, time_bound(profile))
    elif name.startswith("overload-"):
        limit += profile.overload_baseline_s + profile.overload_s + profile.overload_recover_s + profile.throughput_s
    return limit


def plan(names: list[str], profile: Profile) -> list[str]:
    """The order to run: the floors first and again later; the rest split between the rounds."""
    floors = ["noop"] + (["noop-http", "noop-http-granian"] if HTTP_FLOOR_USERS & set(names) else [])
    rest = [n for n in names if n not in FLOORS]
    order = list(floors)
    if rest and profile.noop_rounds > 1:
        chunks = profile.noop_rounds - 1
        size = -(-len(rest) // chunks)
        for i in range(chunks):
            order += [*rest[i * size : (i + 1) * size], *floors]
    else:
        order += rest
    return order
