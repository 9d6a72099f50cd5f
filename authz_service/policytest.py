"""test-policy: what Check decides for a described request, and why each policy did or did not allow.

`POST /auth/test-policy` (server/admin.py) and `authz-service explain` (cli.py) both run
`run_policy_test`. The decision is Check's own: the same Authorizer finds and verifies the token
(through the verified-token cache and the introspectors, as Check does) and asks the policies.
Only then are the policies explained, by the slow walk of policy/explain.py that Check never runs.

The body, as SPEC gives it, with Aidbox's spellings accepted too:

    request:                      # Aidbox: uri (+ query-string), request-method
      method: GET
      path: /fhir/Patient/pt-1?_elements=id
      headers: {authorization: Bearer eyJ...}
      host, scheme, remote-addr   # optional
    policies: [AccessPolicy, ...] # optional: try these instead of the configured ones (Aidbox: policy)
    identity:                     # optional: skip token verification and decide for these claims,
      introspector: keycloak      #   as if that introspector had verified them (offline policy tests)
      claims: {sub: alice}
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from authz_service.config.model import DRY_RUN, Config, PolicyConfig
from authz_service.decide import Authorizer
from authz_service.engine import IdentityShaper
from authz_service.errors import AuthzError, ConfigError, MalformedRequest
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.policy.explain import Redactor, explain_policies
from authz_service.registries import validate_policies
from authz_service.tokens.jwt import user_id_of

_REQUEST_FIELDS = {
    "method": "method",
    "request-method": "method",
    "path": "path",
    "uri": "path",
    "query-string": "query",
    "headers": "headers",
    "host": "host",
    "scheme": "scheme",
    "remote-addr": "remote_addr",
    "remote_addr": "remote_addr",
}
# Aidbox's test-policy lets the caller name a user or client; here they come from the token, as in
# Check, so a test cannot pass on an identity Check would never see. `identity` is the explicit way.
_NOT_HERE = {
    "user": "the user comes from the token, as in Check (or give top-level `identity` claims)",
    "user-id": "the user comes from the token, as in Check (or give top-level `identity` claims)",
    "client": "the client comes from the token's client_id or azp claim",
    "client-id": "the client comes from the token's client_id or azp claim",
    "jwt": "claims come from a verified token (or give top-level `identity` claims)",
}


class PolicyTestError(AuthzError):
    """A test-policy body that cannot be run: 400 when malformed, 422 when it names invalid things."""

    def __init__(self, status: int, problems: list[str]) -> None:
        self.status = status
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, slots=True)
class SuppliedIdentity:
    """Claims to decide for as if `introspector` had verified them."""

    introspector: str
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PolicyTest:
    """One parsed test-policy body."""

    request: HttpRequest
    policies: tuple[PolicyConfig, ...] | None = None  # None: the configured ones
    identity: SuppliedIdentity | None = None


def parse_policy_test(body: Any, config: Config) -> PolicyTest:
    """A PolicyTest from a parsed JSON/YAML body; PolicyTestError naming every problem."""
    if not isinstance(body, Mapping):
        raise PolicyTestError(400, ["the body must be a mapping with a `request`"])
    unknown = sorted(str(key) for key in body if key not in ("request", "policies", "policy", "identity"))
    if unknown:
        raise PolicyTestError(422, [f"{key}: unknown field (request, policies, identity)" for key in unknown])
    request = _request(body.get("request"))
    policies = None
    if "policies" in body and "policy" in body:
        raise PolicyTestError(422, ["give `policies` (a list) or Aidbox's `policy` (one), not both"])
    raw_policies = body["policies"] if "policies" in body else [body["policy"]] if "policy" in body else None
    if raw_policies is not None:
        if isinstance(raw_policies, list):
            # Aidbox's test-policy takes a policy without an id: give each one, for the answer.
            raw_policies = [
                {"id": f"policies[{i}]", **p} if isinstance(p, Mapping) and "id" not in p else p
                for i, p in enumerate(raw_policies)
            ]
        try:
            policies = validate_policies(raw_policies, (i.id for i in config.introspectors))
        except ConfigError as err:
            raise PolicyTestError(422, [str(problem) for problem in err.problems]) from None
    return PolicyTest(request, policies, _identity(body.get("identity"), config))


def _request(raw: Any) -> HttpRequest:
    if not isinstance(raw, Mapping):
        raise PolicyTestError(400, ["request: must be a mapping such as {method: GET, path: /fhir/Patient}"])
    problems = [f"request.{key}: {why}" for key, why in _NOT_HERE.items() if key in raw]
    problems += [f"request.{key}: unknown field" for key in raw if key not in _REQUEST_FIELDS and key not in _NOT_HERE]
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        name = _REQUEST_FIELDS.get(key)
        if name is None:
            continue
        if name in fields:
            problems.append(f"request.{key}: given twice (under two spellings)")
        elif name == "headers":
            if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                problems.append("request.headers: must map header names to string values")
            else:
                fields[name] = {k.lower(): v for k, v in value.items()}
        elif not isinstance(value, str):
            problems.append(f"request.{key}: must be a string")
        else:
            fields[name] = value
    path = fields.get("path", "")
    if not path.startswith("/"):
        problems.append("request.path: is required and must start with /")
    if problems:
        raise PolicyTestError(422, problems)
    query = fields.pop("query", "")
    if query:
        path = f"{path}&{query}" if "?" in path else f"{path}?{query}"
    headers: dict[str, str] = fields.get("headers", {})
    return HttpRequest(
        method=fields.get("method", "GET").upper(),
        path=path,
        host=fields.get("host", headers.get("host", "")),
        scheme=fields.get("scheme", ""),
        headers=headers,
        remote_addr=fields.get("remote_addr", ""),
    )


def _identity(raw: Any, config: Config) -> SuppliedIdentity | None:
    if raw is None:
        return None
    ids = [i.id for i in config.introspectors]
    if not isinstance(raw, Mapping) or set(raw) - {"introspector", "claims"}:
        raise PolicyTestError(422, ["identity: must be {introspector: ID, claims: {...}}"])
    introspector, claims = raw.get("introspector"), raw.get("claims")
    problems = []
    if introspector not in ids:
        problems.append(f"identity.introspector: must be one of the configured introspectors {ids}")
    if not isinstance(claims, Mapping) or not claims:
        problems.append("identity.claims: must be a non-empty mapping of claims")
    if problems or not isinstance(claims, Mapping):
        raise PolicyTestError(422, problems)
    return SuppliedIdentity(str(introspector), dict(claims))


async def run_policy_test(authorizer: Authorizer, config: Config, test: PolicyTest) -> dict[str, Any]:
    """The SPEC's answer: decision, reason, the allowing policy, the context shown without
    secrets, and every policy's verdict with the reasons it did not allow."""
    if test.policies is not None:
        authorizer = authorizer.with_policies(test.policies)
    request = test.request
    if test.identity is None:
        decision = await authorizer.check(request)
        identity = decision.identity
        # Policies are asked for a verified identity, and for a request with no token at all.
        asked = decision.outcome in (Outcome.ALLOW, Outcome.FORBIDDEN) or decision.reason is Reason.MISSING_TOKEN
    else:
        identity = _supplied(test.identity, config)
        decision = authorizer.decide(request, identity)
        asked = True
    # The context as Check built it: from the path as judged (dot segments resolved), not as sent.
    with contextlib.suppress(MalformedRequest):
        request = authorizer.judged(request)
    context = authorizer.context(request, identity)
    credentials = authorizer.credentials
    redactor = Redactor(credentials.token_headers, credentials.token_params, context)
    introspector = identity.introspector if identity is not None else None
    if asked and authorizer.policies:
        policies = [item.as_json() for item in explain_policies(authorizer.policies, context, introspector, redactor)]
    else:
        why = _not_asked(decision)
        policies = [
            {"id": policy.id, "matched": False, "why": [why], **({"mode": DRY_RUN} if policy.dry_run else {})}
            for policy in authorizer.policies
        ]
    answer: dict[str, Any] = {
        "decision": decision.outcome.value,
        "reason": decision.reason.label,
        "policy": decision.policy,
        "user_id": identity.user_id if identity is not None else None,
        "introspector": introspector,
        "context": redactor.context(context),
        "policies": policies,
    }
    if decision.dry_run:  # as the decision log line: only when dry-run policies were asked
        answer["dry_run"] = [{"policy": policy, "would": would} for policy, would in decision.dry_run]
    return answer


def _supplied(supplied: SuppliedIdentity, config: Config) -> Identity:
    """The identity the named introspector would have produced for these claims, shaped as Check's."""
    [source] = [i for i in config.introspectors if i.id == supplied.introspector]
    kind = "jwt" if source.kind == "jwt" else "opaque"
    fallbacks = () if kind == "jwt" else ("username",)
    identity = Identity(user_id_of(supplied.claims, *fallbacks), supplied.claims, supplied.introspector, kind)
    return IdentityShaper(config.response, keep_claims=True)(identity)


def _not_asked(decision: Decision) -> str:
    if decision.outcome is Outcome.UNAUTHENTICATED:
        return f"not asked: the request is unauthenticated ({decision.reason.label}), so no policy can allow it"
    if decision.outcome is Outcome.INVALID_REQUEST:
        return f"not asked: the request's credentials are malformed ({decision.reason.label})"
    return f"not asked: the identity could not be established ({decision.reason.label})"


# -- `authz-service explain`: the same test, offline, from a file ------------------------------

_DECISIONS = ("allow", "unauthenticated", "forbidden", "invalid_request", "unavailable")


@dataclass(frozen=True, slots=True)
class FileCase:
    """One case of an explain file: a test-policy body, its name, and what CI expects of it."""

    name: str
    body: Mapping[str, Any]
    expect: str | None = None  # a decision
    expect_policy: str | None = None  # the policy that should allow


def read_cases(raw: Any) -> list[FileCase]:
    """The cases of an explain file: one test-policy body, or a list of them, each optionally with
    `name`, `expect` (a decision) and `expect_policy`; PolicyTestError naming the bad case."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise PolicyTestError(400, ["the file holds no cases"])
    cases = []
    for index, item in enumerate(items):
        where = f"case {index + 1}"
        if not isinstance(item, Mapping):
            raise PolicyTestError(400, [f"{where}: must be a mapping with a `request`"])
        body = {key: value for key, value in item.items() if key not in ("name", "expect", "expect_policy")}
        name, expect, policy = item.get("name", where), item.get("expect"), item.get("expect_policy")
        if not isinstance(name, str):
            raise PolicyTestError(422, [f"{where}: name must be a string"])
        if expect is not None and expect not in _DECISIONS:
            raise PolicyTestError(422, [f"{name}: expect must be one of {', '.join(_DECISIONS)}, got {expect!r}"])
        if policy is not None and not isinstance(policy, str):
            raise PolicyTestError(422, [f"{name}: expect_policy must be a policy id"])
        if policy is not None and expect not in (None, "allow"):
            raise PolicyTestError(422, [f"{name}: expect_policy names the policy that allows; expect is {expect!r}"])
        cases.append(FileCase(name, body, "allow" if policy is not None and expect is None else expect, policy))
    return cases


def failed_expectation(case: FileCase, answer: Mapping[str, Any]) -> str | None:
    """What the answer breaks of the case's expectations, or None."""
    if case.expect is not None and answer["decision"] != case.expect:
        return f"expected {case.expect}, got {answer['decision']}"
    if case.expect_policy is not None and answer["policy"] != case.expect_policy:
        return f"expected policy {case.expect_policy!r} to allow, got {answer['policy']!r}"
    return None


def describe(case: FileCase, test: PolicyTest, answer: Mapping[str, Any], verbose: bool = False) -> str:
    """An answer for people: the decision line, then (for a case without expectations, one that
    failed them, or when verbose) each policy's verdict with why it did not allow."""
    allowing = f" by policy {answer['policy']!r}" if answer["policy"] else ""
    failure = failed_expectation(case, answer)
    verdict = "" if case.expect is None and case.expect_policy is None else "  FAIL: " + failure if failure else "  ok"
    # The path as the shown context has it: a token in the query is redacted there.
    context = answer["context"]
    path = context.get("uri", "") + (f"?{context['query-string']}" if context.get("query-string") else "")
    watched = "".join(f"; dry-run {item['policy']!r} would {item['would']}" for item in answer.get("dry_run", ()))
    lines = [
        f"{case.name}: {test.request.method} {_shown_path(path)} -> "
        f"{answer['decision']} ({answer['reason']}){allowing}{watched}{verdict}"
    ]
    if verdict == "  ok" and not verbose:
        return lines[0]
    for policy in answer["policies"]:
        name = f"policy {policy['id']}" + (" (dry-run)" if policy.get("mode") == DRY_RUN else "")
        if policy["matched"]:
            lines.append(f"  {name}: " + ("would allow" if policy.get("mode") == DRY_RUN else "matched"))
            continue
        lines.append(f"  {name}: " + ("would deny" if policy.get("mode") == DRY_RUN else "not matched"))
        lines.extend(f"    - {why}" for why in policy["why"])
    return "\n".join(lines)


def _shown_path(path: str) -> str:
    return path if len(path) <= 100 else path[:99] + "…"
