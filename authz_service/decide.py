"""The Check path, top to bottom: credentials -> introspector (cached) -> user -> policies -> Decision.

Pure apart from the awaited identity source, which owns its network and caches behind the
Introspector protocol. Envoy's message types never reach this module (envoy.py converts at both
ends), and neither does any HTTP client, cache backend or server: engine.py wires those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from authz_service.config.model import PolicyConfig
from authz_service.context import build_context
from authz_service.errors import MalformedCredentials, TokenRejected, UpstreamUnavailable
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.observe import log_internal_error
from authz_service.tokens.base import Credential
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
    ) -> None:
        self._credentials = credentials
        self._identities = identities
        self._policies = tuple(policies)
        self._users = users or {}

    async def check(self, request: HttpRequest) -> Decision:
        """The decision for one request. Never raises: any error becomes a deny."""
        try:
            credential = self._credentials.find(request)
            if credential is None:
                # Anonymous: only a policy can let it through, and then with no identity headers.
                if self._policies and self._allowed(build_context(request, None, None), None):
                    return Decision(Outcome.ALLOW, Reason.ANONYMOUS)
                return Decision(Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN)
            identity = await self._identities.introspect(credential)
            if self._policies:
                user = self._users.get(identity.user_id) if identity.user_id is not None else None
                context = build_context(request, identity, user)
                if not self._allowed(context, identity.introspector):
                    return Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, identity)
            return Decision(Outcome.ALLOW, Reason.ALLOWED, identity, identity.headers)
        except TokenRejected as err:
            return Decision(Outcome.UNAUTHENTICATED, err.reason)
        except MalformedCredentials as err:
            return Decision(Outcome.INVALID_REQUEST, err.reason)
        except UpstreamUnavailable:
            return Decision(Outcome.UNAVAILABLE, Reason.IDP_UNAVAILABLE)
        except Exception as err:
            log_internal_error(err)
            return Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)

    def _allowed(self, context: Mapping[str, Any], introspector: str | None) -> bool:
        """Policies are OR-ed: the first that matches allows."""
        return any(policy.allows(context, introspector) for policy in self._policies)
