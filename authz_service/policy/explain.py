"""Why each AccessPolicy did or did not allow a request: the slow walk behind test-policy.

Check never comes here. It runs the compiled predicates and stops at the first that allows. An
explanation asks every policy, and for each one that does not allow it says why: the scope that
excludes the request (introspectors, roleName, link), or the engine's own reasons (the first
failing matcho path, the json-schema messages, the failing complex branch).

Nothing secret reaches an explanation: values are rendered through a Redactor that knows the
request's token-bearing headers and query parameters, and every reason is scrubbed of their
values before it is cut to length.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from authz_service.config.model import DRY_RUN, PolicyConfig
from authz_service.errors import PolicyTimeout
from authz_service.policy import ENGINES
from authz_service.policy.budget import budget_ms
from authz_service.policy.evaluate import admits

REDACTED = "<redacted>"
# `dpop`: a DPoP proof (RFC 9449) is a credential too, replayable within its window.
ALWAYS_SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "dpop")
MIN_SCRUBBED = 6  # shorter secret values are redacted where they sit, not hunted for in every text
MAX_VALUE = 120  # characters of a value shown in a reason
MAX_REASON = 400


@dataclass(frozen=True, slots=True)
class PolicyExplanation:
    """One policy's verdict on one request, for people."""

    id: str
    matched: bool
    why: tuple[str, ...] = ()
    dry_run: bool = False  # `mode: dry-run`: matched means it would allow; it decides nothing

    def as_json(self) -> dict[str, Any]:
        """The SPEC's `{"id", "matched", "why"}`, with `"mode": "dry-run"` for a dry-run policy."""
        shown: dict[str, Any] = {"id": self.id, "matched": self.matched, "why": list(self.why)}
        if self.dry_run:
            shown["mode"] = DRY_RUN
        return shown


class Redactor:
    """Renders context values for people with the request's secrets taken out."""

    def __init__(self, secret_headers: Iterable[str], secret_params: Iterable[str], context: Mapping[str, Any]) -> None:
        self._headers = frozenset(name.lower() for name in (*ALWAYS_SECRET_HEADERS, *secret_headers))
        self._params = frozenset(secret_params)
        found: set[str] = set()
        for name, value in _mapping(context.get("headers")).items():
            if name.lower() in self._headers and isinstance(value, str):
                found.add(value.strip())
                if name.lower() in ("cookie", "set-cookie"):
                    found.update(pair.partition("=")[2].strip() for pair in value.split(";"))
                else:
                    # "Bearer <token>": the token alone may be quoted elsewhere (a claim, a param).
                    found.add(value.strip().rpartition(" ")[2])
        for name, value in _mapping(context.get("params")).items():
            if name in self._params:
                found.update(item for item in (value if isinstance(value, list) else [value]) if isinstance(item, str))
        # Longest first, so "Bearer abc" is replaced whole before "abc" would split it.
        self._secrets = tuple(sorted((s for s in found if len(s) >= MIN_SCRUBBED), key=len, reverse=True))

    def scrub(self, text: str) -> str:
        """`text` with every secret value replaced."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def show(self, value: Any) -> str:
        """A value as a reason quotes it: strings in quotes, the rest as compact JSON; scrubbed, then
        cut to MAX_VALUE characters (in that order, so no prefix of a secret survives the cut)."""
        text = repr(value) if isinstance(value, str) else _json(value)
        return _cut(self.scrub(text), MAX_VALUE)

    def context(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of the context fit to show: token-bearing headers and params replaced, and every
        string scrubbed."""
        shown: dict[str, Any] = self._scrub_all(context)
        headers = shown.get("headers")
        if isinstance(headers, dict):
            for name in headers:
                if name.lower() in self._headers:
                    headers[name] = REDACTED
        params = shown.get("params")
        if isinstance(params, dict):
            for name in params:
                if name in self._params:
                    params[name] = REDACTED
        return shown

    def _scrub_all(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: self._scrub_all(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub_all(item) for item in value]
        if isinstance(value, str):
            return self.scrub(value)
        return value


def explain_policies(
    policies: Sequence[PolicyConfig], context: Mapping[str, Any], introspector: str | None, redactor: Redactor
) -> list[PolicyExplanation]:
    """Every policy's verdict on the context, in config order (Check allows with the first match)."""
    return [explain_policy(policy, context, introspector, redactor) for policy in policies]


def explain_policy(
    policy: PolicyConfig, context: Mapping[str, Any], introspector: str | None, redactor: Redactor
) -> PolicyExplanation:
    """One policy's verdict: matched, or the reasons it did not (a rule that runs past its regex
    time budget here as in Check is one reason: Check denies the request)."""
    scope = _out_of_scope(policy, context, introspector, redactor)
    if scope is not None:
        return PolicyExplanation(policy.id, False, (scope,), policy.dry_run)
    try:
        if policy.predicate(context):
            return PolicyExplanation(policy.id, True, dry_run=policy.dry_run)
        reasons = ENGINES[policy.engine].explain(policy.rule, context, redactor.show) or ["does not match"]
    except PolicyTimeout as err:
        outcome = "counts as would deny" if policy.dry_run else "so Check denies the request (403 policy_timeout)"
        reasons = [f"{err.what}: ran past its time budget ({budget_ms()} ms of regex matching), {outcome}"]
    why = tuple(_cut(redactor.scrub(reason), MAX_REASON) for reason in reasons)
    return PolicyExplanation(policy.id, False, why, policy.dry_run)


def _out_of_scope(
    policy: PolicyConfig, context: Mapping[str, Any], introspector: str | None, redactor: Redactor
) -> str | None:
    """Why the policy does not apply to this request at all, or None when it does."""
    if policy.introspectors is not None and introspector not in policy.introspectors:
        this = f"this request's token came through {introspector!r}" if introspector else "this request has no token"
        return f"introspectors: applies only to tokens of {sorted(policy.introspectors)}; {this}"
    roles = context.get("roles", ())
    if policy.role_name is not None and policy.role_name not in roles:
        user = _mapping(context.get("user")).get("id")
        if user is None:
            return f"roleName: applies only to users holding a Role named {policy.role_name!r}; no known user"
        held = ", ".join(repr(name) for name in roles) or "none"
        return f"roleName: applies only to users holding a Role named {policy.role_name!r}; user {user!r} holds {held}"
    if policy.links is not None and not admits(policy.links, context):
        user = _mapping(context.get("user")).get("id")
        client = _mapping(context.get("client")).get("id")
        operation = _mapping(context.get("operation")).get("id")
        seen = ", ".join(
            f"{kind} {redactor.show(value)}"
            for kind, value in (("user", user), ("client", client), ("operation", operation))
            if value is not None
        )
        return f"link: applies only to the linked users, clients and operations; this request has {seen or 'none'}"
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
    except ValueError:  # circular: cannot come from JSON, but never fail an explanation over it
        return repr(value)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
