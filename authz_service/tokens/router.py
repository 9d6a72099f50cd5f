"""Which introspector a credential goes to.

A credential bound by its source (an introspector's cookie) goes to that introspector only. A
JWT goes to the introspector that claims its `iss`. A token that is not JWT-shaped is asked of
the introspectors without an issuer (opaque), in config order.

A JWT-shaped token that no issuer claims is never sent to an introspection endpoint unless that
introspector says it takes JWTs (`accepts_jwt: true`): a JWT from an issuer we do not know is
not an opaque token, and posting it would hand a third party's bearer token to our IdP (and turn
every forged JWT into a network call). Without such an introspector it is a 401 `unknown_issuer`
(`malformed` if it does not even parse), decided here, with no network call.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Identity, Reason
from authz_service.tokens.base import Credential, Introspector
from authz_service.tokens.jws import looks_like_jwt, parse_jwt


class IntrospectorRouter:
    """Routes each credential to the introspector that may judge it."""

    def __init__(self, introspectors: Sequence[Introspector], accepts_jwt: Collection[str] = ()) -> None:
        """`accepts_jwt`: the ids of the opaque introspectors that may be sent JWT-shaped tokens."""
        self.members: Mapping[str, Introspector] = {i.id: i for i in introspectors}
        self._by_issuer = {i.issuer: i for i in introspectors if i.issuer is not None}
        self._in_order = tuple(i for i in introspectors if i.issuer is None)
        self._accepts_jwt = frozenset(accepts_jwt)
        self._jwt_in_order = tuple(i for i in self._in_order if i.id in self._accepts_jwt)

    async def introspect(self, credential: Credential) -> Identity:
        """The identity behind the credential; TokenRejected or UpstreamUnavailable when there is none."""
        if credential.introspector is not None:
            introspector = self.members[credential.introspector]
            if (
                introspector.issuer is None
                and introspector.id not in self._accepts_jwt
                and looks_like_jwt(credential.token)
            ):
                # A bound source of an opaque introspector that takes no JWTs: the same rule as below.
                raise TokenRejected(Reason.UNKNOWN_ISSUER)
            return await introspector.introspect(credential)
        token = credential.token
        if not looks_like_jwt(token):
            if not self._in_order:
                raise TokenRejected(Reason.MALFORMED)
            return await self._ask_in_order(self._in_order, credential)
        try:
            parsed = parse_jwt(token)
        except TokenRejected as err:
            rejection = err
        else:
            claimed_by = self._by_issuer.get(parsed.issuer) if parsed.issuer is not None else None
            if claimed_by is not None:
                return await claimed_by.introspect(Credential(token, jwt=parsed))
            rejection = TokenRejected(Reason.UNKNOWN_ISSUER)
        if rejection.reason is Reason.TOO_LARGE or not self._jwt_in_order:
            raise rejection
        return await self._ask_in_order(self._jwt_in_order, credential)

    @staticmethod
    async def _ask_in_order(introspectors: Sequence[Introspector], credential: Credential) -> Identity:
        """The first introspector that finds the token active wins."""
        unavailable: UpstreamUnavailable | None = None
        rejection = TokenRejected(Reason.INACTIVE)
        for introspector in introspectors:
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
