"""The Check path, top to bottom: credentials -> introspector (cached) -> user -> policies -> Decision.

Pure apart from the awaited identity source, which owns its network and caches behind the
Introspector protocol. Envoy's message types never reach this module (envoy.py converts at both
ends), and neither does any HTTP client, cache backend or server: engine.py wires those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from authz_service.config.model import PolicyConfig, RoleConfig
from authz_service.context import build_context
from authz_service.decisionlog import log_dry_run_error, log_internal_error, log_policy_timeout
from authz_service.errors import MalformedRequest, PolicyTimeout, TokenRejected, UpstreamUnavailable
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.paths import normalized
from authz_service.policy.evaluate import allows
from authz_service.routes import unrouted
from authz_service.tokens.base import Credential
from authz_service.tokens.dpop import ReplayCacheUnavailable, SenderConstraints
from authz_service.tokens.sources import CredentialFinder


class IdentitySource(Protocol):
    """Where identities come from: the verified-token cache in front of the introspectors."""

    async def introspect(self, credential: Credential) -> Identity:
        """The identity behind a credential; TokenRejected or UpstreamUnavailable when there is none."""
        ...


class Authorizer:
    """Decides one request. Built once per config (engine.py); holds no network of its own."""

    def __init__(
        self,
        credentials: CredentialFinder,
        identities: IdentitySource,
        policies: Sequence[PolicyConfig] = (),
        users: Mapping[str, Mapping[str, Any]] | None = None,
        roles: Sequence[RoleConfig] = (),
        *,
        authentication_only: bool = False,
        senders: SenderConstraints | None = None,
    ) -> None:
        self._credentials = credentials
        # Checks a sender-constrained token's proof (DPoP, client certificate); None: any `cnf`
        # or DPoP-scheme credential is refused (a binding nobody checks is no binding).
        self._senders = senders
        # Every valid token allowed: only when the config says so (never because policies ran out).
        self._authentication_only = authentication_only
        self._identities = identities
        self._all_policies = tuple(policies)
        # Only enforcing policies decide; dry-run ones are split off once, here (None: there are
        # none, and Check takes the path it takes without the feature). Each with its two answers
        # prebuilt, so a check allocates no pair.
        self._policies = tuple(policy for policy in self._all_policies if not policy.dry_run)
        watched = [p for p in self._all_policies if p.dry_run]
        # `scoped`: whether its introspectors, roleName or link must be asked before its rule.
        self._dry_run: tuple[tuple[PolicyConfig, bool, tuple[str, str], tuple[str, str]], ...] | None = (
            tuple((p, _scoped(p), (p.id, "allow"), (p.id, "deny")) for p in watched) if watched else None
        )
        self._users = users or {}
        # A user's Role resources, in config order; only users the store knows have roles.
        by_user: dict[str, list[RoleConfig]] = {}
        for role in roles:
            if role.user_id in self._users:
                by_user.setdefault(role.user_id, []).append(role)
        self._roles: Mapping[str, tuple[RoleConfig, ...]] = {user: tuple(found) for user, found in by_user.items()}

    @property
    def credentials(self) -> CredentialFinder:
        """Where this authorizer looks for tokens (test-policy redacts what they name)."""
        return self._credentials

    @property
    def policies(self) -> tuple[PolicyConfig, ...]:
        """The policies, in config order, dry-run ones included (each says its `mode`)."""
        return self._all_policies

    def with_policies(self, policies: Sequence[PolicyConfig]) -> Authorizer:
        """The same authorizer (credentials, identities, users, roles) deciding with other policies:
        test-policy's "try these instead"."""
        other = Authorizer(self._credentials, self._identities, policies, senders=self._senders)
        other._users, other._roles = self._users, self._roles
        # Trying policies means deciding by them: an empty trial set allows nothing.
        return other

    async def check(self, request: HttpRequest) -> Decision:
        """The decision for one request. Never raises: any error becomes a deny."""
        credential: Credential | None = None
        try:
            judged = self.judged(request)
            credential = self._credentials.find(judged)
            if credential is None:
                identity = None
            else:
                identity = await self._identities.introspect(credential)
                # The sender constraint, on every request (a cached identity is no proof of
                # possession): a plain bearer token costs these two reads.
                if identity.confirmation is not None or credential.proof is not None:
                    refused = await self._sender_constraint(identity, credential, request)
                    if refused is not None:
                        return refused
            decision = self._decide(judged, identity) if self._dry_run is None else self._watched(judged, identity)
            return decision if judged is request else dataclasses.replace(decision, path=judged.path)
        except TokenRejected as err:
            # A source bound to one introspector (cookie, from_headers, from_params) names who refused it.
            return Decision(Outcome.UNAUTHENTICATED, err.reason, introspector=_bound(credential))
        except MalformedRequest as err:
            return Decision(Outcome.INVALID_REQUEST, err.reason)
        except UpstreamUnavailable as err:
            return Decision(Outcome.UNAVAILABLE, err.reason, introspector=_bound(credential))
        except ReplayCacheUnavailable as err:
            # Fail closed: a proof that may be a replay is never accepted. Not an internal error:
            # the decision log and authz_checks_total say `dpop_replay_unavailable`.
            return Decision(Outcome.UNAVAILABLE, err.reason, introspector=_bound(credential))
        except PolicyTimeout as err:
            log_policy_timeout(err)
            return Decision(Outcome.FORBIDDEN, Reason.POLICY_TIMEOUT)
        except Exception as err:
            log_internal_error(err)
            return Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)

    async def _sender_constraint(
        self, identity: Identity, credential: Credential, request: HttpRequest
    ) -> Decision | None:
        """The 401 (naming the introspector that vouched for the token) unless the request proves
        possession of what the token is bound to; None when it does. ReplayCacheUnavailable (503)
        when a proof's freshness cannot be checked."""
        try:
            if self._senders is None:
                raise TokenRejected(Reason.DPOP_UNBOUND_TOKEN)
            await self._senders.check(identity.confirmation, credential, request)
        except TokenRejected as err:
            return Decision(Outcome.UNAUTHENTICATED, err.reason, introspector=identity.introspector)
        return None

    def judged(self, request: HttpRequest) -> HttpRequest:
        """The request as it is judged: its path as the upstream will route it (paths.py). Raise
        MalformedRequest (400) when it cannot be judged: a path parsers read two ways
        (`ambiguous_path`), or, when policies decide, one FHIR-shaped that is no route (`not_a_route`:
        POST on an instance, an id FHIR forbids, a `;`), which a policy written for a route must not judge."""
        path = normalized(request.path)
        if path is None:
            raise MalformedRequest(Reason.AMBIGUOUS_PATH)
        if self._policies and unrouted(request.method, path):
            raise MalformedRequest(Reason.NOT_A_ROUTE)
        return request if path is request.path else request._replace(path=path)

    def decide(self, request: HttpRequest, identity: Identity | None) -> Decision:
        """The policies' decision for a request whose identity is already known (None: anonymous).
        Never raises; `authz-service explain` uses it for identities it is given."""
        try:
            judged = self.judged(request)
            return self._decide(judged, identity) if self._dry_run is None else self._watched(judged, identity)
        except MalformedRequest as err:
            return Decision(Outcome.INVALID_REQUEST, err.reason)
        except PolicyTimeout as err:
            log_policy_timeout(err)
            return Decision(Outcome.FORBIDDEN, Reason.POLICY_TIMEOUT)
        except Exception as err:
            log_internal_error(err)
            return Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)

    def _decide(
        self, request: HttpRequest, identity: Identity | None, context: Mapping[str, Any] | None = None
    ) -> Decision:
        """The enforcing policies' decision (`context`: already built, by `_watched`)."""
        if identity is None:
            # Anonymous: only a policy can let it through, and then with no identity headers.
            if self._policies:
                allowing = self._allowing(build_context(request, None, None) if context is None else context, None)
                if allowing is not None:
                    return Decision(Outcome.ALLOW, Reason.ANONYMOUS, policy=allowing)
            return Decision(Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN)
        introspector = identity.introspector
        if self._policies:
            allowing = self._allowing(self.context(request, identity) if context is None else context, introspector)
            if allowing is None:
                return Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, identity, introspector=introspector)
            return Decision(
                Outcome.ALLOW, Reason.ALLOWED, identity, identity.headers, allowing, introspector=introspector
            )
        if self._authentication_only:
            return Decision(Outcome.ALLOW, Reason.ALLOWED, identity, identity.headers, introspector=introspector)
        # No policies and no declared authentication-only mode: nothing is allowed (as in Aidbox).
        return Decision(Outcome.FORBIDDEN, Reason.NO_POLICIES, identity, introspector=introspector)

    def _watched(self, request: HttpRequest, identity: Identity | None) -> Decision:
        """The enforcing decision, then every dry-run policy asked on the same context (built once),
        their answers attached. They never change the decision: a dry-run policy that raises (a
        regex past its time budget, an internal error) counts as would=deny and is logged by type;
        an error of an enforcing policy ends the check as it would without dry-run policies."""
        context = self.context(request, identity)
        decision = self._decide(request, identity, context)
        introspector = identity.introspector if identity is not None else None
        answers: list[tuple[str, str]] = []
        for policy, scoped, allow, deny in self._dry_run or ():
            try:
                matched = allows(policy, context, introspector) if scoped else policy.predicate(context)
            except Exception as err:  # never the request's answer: only this policy's
                matched = False
                log_dry_run_error(policy.id, err)
            answers.append(allow if matched else deny)
        # Attached to the Decision `_decide` has just built for this check alone (no one else holds
        # it yet): one slot set, where a second Decision (or dataclasses.replace) cost the bench
        # 3-6 us a check (docs/performance.md).
        object.__setattr__(decision, "dry_run", tuple(answers))
        return decision

    def context(self, request: HttpRequest, identity: Identity | None) -> dict[str, Any]:
        """The policy context of a request, with the identity's user and roles (test-policy uses it too)."""
        if identity is None:
            return build_context(request, None, None)
        user_id = identity.user_id
        user = self._users.get(user_id) if user_id is not None else None
        roles = self._roles.get(user_id, ()) if user_id is not None else ()
        return build_context(request, identity, user, roles)

    def _allowing(self, context: Mapping[str, Any], introspector: str | None) -> str | None:
        """Policies are OR-ed: the id of the first that matches, or None."""
        for policy in self._policies:
            try:
                if allows(policy, context, introspector):
                    return policy.id
            except PolicyTimeout as err:  # the rule knows where it stalled; the policy id is known here
                raise PolicyTimeout(policy.id, err.what) from None
        return None


def _scoped(policy: PolicyConfig) -> bool:
    """Whether a policy applies to some requests only (policy/evaluate.py `applies`)."""
    return policy.introspectors is not None or policy.role_name is not None or policy.links is not None


def _bound(credential: Credential | None) -> str | None:
    """The introspector a credential's source is bound to, if any (Authorization: Bearer is routed)."""
    return None if credential is None else credential.introspector
