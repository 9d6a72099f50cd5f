"""Which introspector a credential goes to.

A credential bound by its source (an introspector's cookie) goes to that introspector only. A
JWT goes to the introspector that claims its `iss`. Anything else (not a JWT, or a JWT no
issuer claims) is asked of the introspectors without an issuer (opaque), in config order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Identity, Reason
from authz_service.tokens.base import Credential, Introspector
from authz_service.tokens.jwt import looks_like_jwt, parse_jwt


class IntrospectorRouter:
    """Routes each credential to the introspector that may judge it."""

    def __init__(self, introspectors: Sequence[Introspector]) -> None:
        self.members: Mapping[str, Introspector] = {i.id: i for i in introspectors}
        self._by_issuer = {i.issuer: i for i in introspectors if i.issuer is not None}
        self._in_order = tuple(i for i in introspectors if i.issuer is None)

    async def introspect(self, credential: Credential) -> Identity:
        """The identity behind the credential; TokenRejected or UpstreamUnavailable when there is none."""
        if credential.introspector is not None:
            return await self.members[credential.introspector].introspect(credential)
        token = credential.token
        rejection = TokenRejected(Reason.MALFORMED)
        if looks_like_jwt(token):
            try:
                parsed = parse_jwt(token)
            except TokenRejected as err:
                rejection = err
            else:
                introspector = self._by_issuer.get(parsed.issuer) if parsed.issuer is not None else None
                if introspector is not None:
                    return await introspector.introspect(Credential(token, jwt=parsed))
                rejection = TokenRejected(Reason.UNTRUSTED_ISSUER)
        if rejection.reason is Reason.TOO_LARGE or not self._in_order:
            raise rejection
        return await self._ask_in_order(credential)

    async def _ask_in_order(self, credential: Credential) -> Identity:
        """The first introspector that finds the token active wins."""
        unavailable: UpstreamUnavailable | None = None
        rejection = TokenRejected(Reason.INACTIVE)
        for introspector in self._in_order:
            try:
                return await introspector.introspect(credential)
            except UpstreamUnavailable as err:
                unavailable = err
            except TokenRejected as err:
                rejection = err
        # Nobody vouched for it. If one could not answer, we cannot know: fail closed with 503.
        if unavailable is not None:
            raise unavailable
        raise rejection
