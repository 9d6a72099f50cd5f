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
    # Sender-constrained tokens (tokens/dpop.py): a DPoP proof (RFC 9449) that fails, ...
    DPOP_MISSING_PROOF = ("dpop_missing_proof", "DPoP proof required")
    DPOP_MULTIPLE_PROOFS = ("dpop_multiple_proofs", "more than one DPoP proof")
    DPOP_PROOF_TOO_LARGE = ("dpop_proof_too_large", "DPoP proof too large")
    DPOP_MALFORMED = ("dpop_malformed", "malformed DPoP proof")
    DPOP_BAD_TYP = ("dpop_bad_typ", "DPoP proof typ must be dpop+jwt")
    DPOP_BAD_ALG = ("dpop_bad_alg", "DPoP proof algorithm not allowed")
    DPOP_BAD_JWK = ("dpop_bad_jwk", "DPoP proof key not usable")
    DPOP_JKT_MISMATCH = ("dpop_jkt_mismatch", "DPoP proof key does not match the token")
    DPOP_BAD_JTI = ("dpop_bad_jti", "DPoP proof jti missing or invalid")
    DPOP_HTM_MISMATCH = ("dpop_htm_mismatch", "DPoP proof htm does not match the request")
    DPOP_HTU_MISMATCH = ("dpop_htu_mismatch", "DPoP proof htu does not match the request")
    DPOP_BAD_IAT = ("dpop_bad_iat", "DPoP proof iat missing or invalid")
    DPOP_STALE = ("dpop_stale", "DPoP proof is too old")
    DPOP_ISSUED_IN_FUTURE = ("dpop_issued_in_future", "DPoP proof issued in the future")
    DPOP_ATH_MISMATCH = ("dpop_ath_mismatch", "DPoP proof is not bound to this token")
    DPOP_BAD_SIGNATURE = ("dpop_bad_signature", "DPoP proof signature verification failed")
    DPOP_REPLAYED = ("dpop_replayed", "DPoP proof already used")
    # ... a token and scheme that do not go together, ...
    DPOP_UNBOUND_TOKEN = ("dpop_unbound_token", "the token is not bound to a DPoP key")
    DPOP_REQUIRED = ("dpop_required", "the token is bound to a key and needs a DPoP proof")
    SENDER_CONSTRAINT_REQUIRED = ("sender_constraint_required", "the token must be sender-constrained")
    BAD_CNF = ("bad_cnf", "the token's confirmation is malformed")
    UNSUPPORTED_CNF = ("unsupported_cnf", "the token's confirmation method is not supported")
    # ... or a certificate-bound token (RFC 8705) without its client certificate.
    NO_CLIENT_CERTIFICATE = ("no_client_certificate", "the token is bound to a client certificate")
    BAD_CLIENT_CERTIFICATE = ("bad_client_certificate", "the client certificate is unreadable")
    CERTIFICATE_MISMATCH = ("certificate_mismatch", "the token is bound to another certificate")
    DPOP_REPLAY_UNAVAILABLE = ("dpop_replay_unavailable", "the DPoP replay cache is unavailable")
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


# The WWW-Authenticate challenge of a sender-constraint refusal (RFC 9449 7.1, RFC 6750 3.1):
# reason -> (scheme, OAuth error code). Every other 401 is a `Bearer` `invalid_token` challenge.
SENDER_CHALLENGES: Mapping[Reason, tuple[str, str]] = MappingProxyType(
    {
        **{
            reason: ("DPoP", "invalid_dpop_proof")
            for reason in Reason
            if reason.label.startswith("dpop_") and reason not in (Reason.DPOP_UNBOUND_TOKEN, Reason.DPOP_REQUIRED)
        },
        Reason.DPOP_UNBOUND_TOKEN: ("DPoP", "invalid_token"),
        Reason.DPOP_REQUIRED: ("DPoP", "invalid_token"),
    }
)


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A token's `cnf` (RFC 7800) as far as we verify it: a DPoP key thumbprint (RFC 9449 6), a
    client certificate hash (RFC 8705 3.1); tokens/dpop.py reads and checks it."""

    jkt: str | None = None
    x5t_s256: str | None = None


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
    # The token's `cnf`, kept apart from the claims (shaping may drop those): a request with this
    # identity must prove possession (decide.py, on every request, cache hit or not). None: a plain
    # bearer token, the common case, which costs one `is None` a check.
    confirmation: Confirmation | None = None


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
    # The client's TLS certificate as the proxy passed it (Envoy's `include_peer_certificate`:
    # URL-encoded PEM), "" without one: what a certificate-bound token (cnf.x5t#S256) is checked against.
    certificate: str = ""
