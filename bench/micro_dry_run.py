"""What one dry-run AccessPolicy costs the allow path: Authorizer.check (authz_service.decide) with
the identity already verified (a cached identity: no token is parsed, no IdP is asked), one
enforcing matcho policy that allows, without and with one dry-run matcho policy.

Both authorizers come from the same config text through the real validation (compiled matcho
rules, the regex budget), differing only by the dry-run policy. Each round times a time-bounded
loop of checks of each variant in turn (the order alternating between rounds) as CPU time of the
thread (time.thread_time), so other processes on the machine blur it less; the figure is the
median over rounds. The target (issue 23, docs/performance.md): the dry-run variant costs the
allow path less than 10% more.

    python bench/micro_dry_run.py --rounds 9 --seconds 0.5     # prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from authz_service.decide import Authorizer
from authz_service.engine import IdentityShaper
from authz_service.model import HttpRequest, Identity, Outcome
from authz_service.registries import parse_config
from authz_service.tokens.base import Credential
from authz_service.tokens.sources import CredentialFinder

BATCH = 200

CONFIG = """
introspectors:
  - id: keycloak
    type: jwt
    jwt: {iss: "https://idp.example.com", secret: micro-dry-run-hmac-secret-0123456789}
policies:
  - id: patients-read
    engine: matcho
    matcho:
      uri: '#^/fhir/Patient/'
      request-method: get
      jwt: {sub: present?, scope: {$contains: patient/*.read}}
"""

DRY_RUN_POLICY = """
  - id: practitioners-read
    mode: dry-run
    engine: matcho
    matcho:
      uri: '#^/fhir/(Patient|Observation)/'
      request-method: {$enum: [get, head]}
      jwt: {roles: {$contains: practitioner}}
"""
# The mechanism alone: a dry-run rule of one string comparison.
TRIVIAL_DRY_RUN_POLICY = """
  - id: practitioners-read
    mode: dry-run
    engine: matcho
    matcho: {uri: /fhir/Practitioner}
"""
# What the same rule costs Check when it enforces: asked first, it does not match, the next allows.
ENFORCING_FIRST = CONFIG.replace(
    "policies:\n", "policies:\n" + DRY_RUN_POLICY.replace("    mode: dry-run\n", "").lstrip("\n"), 1
)


class CachedIdentity:
    """The verified-token cache on a hit: the identity at once, no token parsed."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity

    async def introspect(self, credential: Credential) -> Identity:
        return self._identity


def authorizer(config_text: str) -> tuple[Authorizer, Identity]:
    config = parse_config(config_text, {})
    claims = {
        "iss": "https://idp.example.com",
        "sub": "2c9a1f4e-7b3d-4e8a-9f10-3b5c7d9e1f20",
        "scope": ["patient/*.read", "openid"],
        "roles": ["nurse"],
        "email": "nurse@example.com",
    }
    raw = Identity(str(claims["sub"]), claims, "keycloak", "jwt")
    identity = IdentityShaper(config.response, keep_claims=True)(raw)  # as the cache holds it
    return (
        Authorizer(CredentialFinder(config.introspectors), CachedIdentity(identity), config.policies),
        identity,
    )


REQUEST = HttpRequest(
    method="GET",
    path="/fhir/Patient/pt-1?_format=json",
    host="api.example.com",
    scheme="https",
    headers=MappingProxyType({"authorization": "Bearer eyJ.cached.token", "x-request-id": "9f3c1d2e"}),
    remote_addr="10.0.0.7",
    request_id="9f3c1d2e",
)


async def per_check_us(subject: Authorizer, seconds: float) -> float:
    """CPU µs per check over a loop of at least `seconds` of CPU time."""
    check = subject.check
    done = 0
    started = time.thread_time()
    while True:
        for _ in range(BATCH):
            await check(REQUEST)
        done += BATCH
        spent = time.thread_time() - started
        if spent >= seconds:
            return 1e6 * spent / done


async def measure(rounds: int, seconds: float) -> dict[str, Any]:
    variants = {
        "without": CONFIG,
        "with_dry_run": CONFIG + DRY_RUN_POLICY,
        "with_trivial_dry_run": CONFIG + TRIVIAL_DRY_RUN_POLICY,
        "same_rule_enforcing_first": ENFORCING_FIRST,
    }
    subjects = {name: authorizer(text)[0] for name, text in variants.items()}
    # The same answer every way (the dry-run rule would deny: this nurse is no practitioner).
    decisions = {name: await subject.check(REQUEST) for name, subject in subjects.items()}
    assert all(d.outcome is Outcome.ALLOW and d.policy == "patients-read" for d in decisions.values()), decisions
    assert decisions["with_dry_run"].dry_run == (("practitioners-read", "deny"),)
    assert decisions["without"].dry_run == ()
    assert len(subjects["same_rule_enforcing_first"].policies) == 2
    for subject in subjects.values():
        await per_check_us(subject, seconds / 4)  # warm up
    runs: dict[str, list[float]] = {name: [] for name in subjects}
    names = list(subjects)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            runs[name].append(await per_check_us(subjects[name], seconds))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    base = medians["without"]
    result: dict[str, Any] = {"rounds": rounds, "seconds_per_round": seconds}
    for name, value in medians.items():
        result[f"{name}_us"] = round(value, 3)
        if name != "without":
            result[f"{name}_pct"] = round(100 * (value - base) / base, 1)
    result["runs_us"] = {name: [round(value, 3) for value in values] for name, values in runs.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per variant per round")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.rounds, args.seconds))))


if __name__ == "__main__":
    main()
