"""Value types shared by the pure core: outcomes, reasons, identities, decisions."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple


class Outcome(enum.Enum):
    """What Check answers; envoy.py maps each to a gRPC code and HTTP status in one table."""

    ALLOW = "allow"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    INVALID_REQUEST = "invalid_request"
    UNAVAILABLE = "unavailable"


class Reason(enum.Enum):
    """Why a decision was taken: a stable label (metrics, logs) and a client-safe description."""

    ALLOWED = ("allowed", "")
    ANONYMOUS = ("anonymous", "")
    MISSING_TOKEN = ("missing_token", "authentication required")
    MALFORMED = ("malformed", "malformed token")
    TOO_LARGE = ("too_large", "token too large")
    UNTRUSTED_ISSUER = ("untrusted_issuer", "no introspector accepts this token")
    BAD_ALGORITHM = ("bad_algorithm", "token algorithm not allowed")
    UNSUPPORTED_CRIT = ("unsupported_crit", "token has unsupported critical header parameters")
    UNKNOWN_KEY = ("unknown_key", "token signing key not found")
    BAD_SIGNATURE = ("bad_signature", "token signature verification failed")
    EXPIRED = ("expired", "token expired")
    NOT_YET_VALID = ("not_yet_valid", "token not yet valid")
    ISSUED_IN_FUTURE = ("issued_in_future", "token issued in the future")
    BAD_AUDIENCE = ("bad_audience", "token audience not accepted")
    BAD_CLAIMS = ("bad_claims", "token claims are invalid")
    LIFETIME_TOO_LONG = ("lifetime_too_long", "token lifetime exceeds the allowed maximum")
    INACTIVE = ("inactive", "token is not active")
    MULTIPLE_CREDENTIALS = ("multiple_credentials", "more than one Authorization value")
    NO_ORIGINAL_URI = ("no_original_uri", "the proxy did not send X-Forwarded-Uri or X-Original-URI")
    FORBIDDEN = ("forbidden", "no access policy allows this request")
    NO_POLICIES = ("no_policies", "no access policy allows this request")
    AMBIGUOUS_PATH = ("ambiguous_path", "the request path can be read more than one way")
    AMBIGUOUS_QUERY = ("ambiguous_query", "a query parameter name can be read more than one way")
    NOT_A_ROUTE = ("not_a_route", "the path looks like a FHIR route but is none")
    CONFLICTING_ORIGINAL = ("conflicting_original", "the proxy's original-request headers disagree")
    HEADERS_TOO_LARGE = ("headers_too_large", "request headers too large")
    UNKNOWN_ISSUER = ("unknown_issuer", "no introspector accepts tokens from this issuer")
    SENDER_CONSTRAINED = ("sender_constrained", "the token is bound to a key and needs a proof of possession")
    POLICY_TIMEOUT = ("policy_timeout", "an access policy took too long to evaluate")
    INTROSPECTION_CLIENT_AUTH = ("introspection_client_auth", "identity provider unavailable")
    IDP_UNAVAILABLE = ("idp_unavailable", "identity provider unavailable")
    INTERNAL_ERROR = ("internal_error", "internal error")
    OVERLOADED = ("overloaded", "too many checks in flight, try again")
    DEADLINE_EXCEEDED = ("deadline_exceeded", "the caller stopped waiting before the check began")
    UNDECODABLE_REQUEST = ("undecodable_request", "the check request could not be decoded")

    def __init__(self, label: str, description: str) -> None:
        self.label = label
        self.description = description


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token: who it names, its claims, and which introspector vouched for it."""

    user_id: str | None
    # The verified claims. Once shaped for reuse (engine.IdentityShaper) they are the claims as
    # policies see them, empty values removed: the raw ones would double a cached entry's size.
    claims: Mapping[str, Any]
    introspector: str
    kind: str  # "jwt" or "opaque": decides whether policies see it as `jwt` or `token`
    expires_at: float | None = None  # the token's exp (epoch seconds), when it has one
    # Until when (epoch seconds) the answer this identity came from may be reused (opaque: the
    # life of the cached introspection answer); the introspector's trusted_until reads it.
    answer_until: float | None = None
    # The headers this identity earns upstream (user id, claims, claim_headers), shaped once per
    # verification by envoy.IdentityHeaders, not per request. Flat: (name, value, name, value, ...)
    # (header_pairs() reads it as pairs): a tuple of pair tuples would cost ~100 bytes more for
    # each of the 100,000 identities a cache may hold.
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one Check, before it is turned into an Envoy CheckResponse."""

    outcome: Outcome
    reason: Reason
    identity: Identity | None = None
    # Set on allow only: the identity headers to send upstream, flat as Identity.headers.
    headers: tuple[str, ...] = field(default=())
    policy: str | None = None  # the AccessPolicy that allowed (None: no policies, or a deny)
    # The path as judged (dot segments resolved, unreserved characters decoded), when it is not the
    # request's own: the decision log writes what the policies saw, which the upstream routes.
    path: str | None = None
    # The introspector that judged the request, when one is known: the identity's on an allow or a
    # policy deny, the credential's bound source when its token is refused or its IdP is down.
    introspector: str | None = None
    # What the dry-run AccessPolicies would have done, in config order: (policy id, "allow" | "deny")
    # pairs; empty when none is configured or the check did not reach the policies.
    dry_run: tuple[tuple[str, str], ...] = ()


def header_pairs(flat: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(name, value) pairs of a flat header tuple (Identity.headers, Decision.headers)."""
    return zip(flat[::2], flat[1::2], strict=True)


_NO_STRINGS: Mapping[str, str] = MappingProxyType({})


class HttpRequest(NamedTuple):
    """What Check needs of the incoming request, independent of Envoy's message types.

    A NamedTuple rather than a frozen dataclass: one is built per Check, and a tuple is built in
    a fraction of the time (a frozen dataclass sets each field through object.__setattr__).
    """

    method: str = "GET"
    path: str = "/"  # as Envoy sent it: path plus query
    host: str = ""
    scheme: str = ""
    headers: Mapping[str, str] = _NO_STRINGS  # lower-case names
    remote_addr: str = ""
    request_id: str = ""
    context_extensions: Mapping[str, str] = _NO_STRINGS
