"""JWS compact serialization, parsed strictly and not yet verified (RFC 7515 3.1).

A strict base64url regex per segment, UTF-8 JSON without duplicate keys or NaN (`strictjson`),
a size cap before any decoding, and refusal of what we never implement (`crit`, `b64`). Both the
router (which needs `iss` before it knows the introspector) and `tokens.jwt` (which verifies)
use it; it imports nothing of either.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from authz_service import strictjson
from authz_service.errors import TokenRejected
from authz_service.model import Reason
from authz_service.tokens.keys import MAX_KID_LENGTH

MAX_TOKEN_BYTES = 8192
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class ParsedJwt:
    """A JWS compact token split and decoded, not yet verified."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.header["alg"])

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None

    @property
    def issuer(self) -> str | None:
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else None


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(segment: str) -> dict[str, Any]:
    value = strictjson.loads(_b64decode(segment))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def looks_like_jwt(token: str) -> bool:
    """Cheap shape test: three dot-separated parts, the first a base64url JSON object."""
    return token.count(".") == 2 and token.startswith("eyJ")


def parse_jwt(token: str) -> ParsedJwt:
    """Split and decode a compact JWS; raise TokenRejected(MALFORMED/...) on any irregularity."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected(Reason.TOO_LARGE)
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRejected(Reason.MALFORMED)
    header_b64, payload_b64, signature_b64 = parts
    if not (_SEGMENT.fullmatch(header_b64) and _SEGMENT.fullmatch(payload_b64) and _SIGNATURE.fullmatch(signature_b64)):
        raise TokenRejected(Reason.MALFORMED)
    try:
        header = _json_object(header_b64)
        claims = _json_object(payload_b64)
        signature = _b64decode(signature_b64)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError) as err:
        raise TokenRejected(Reason.MALFORMED) from err
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise TokenRejected(Reason.MALFORMED)
    if "crit" in header:
        # We implement no JWS extensions, so any critical one must make us refuse (RFC 7515 4.1.11).
        raise TokenRejected(Reason.UNSUPPORTED_CRIT)
    if "b64" in header:
        # RFC 7797 unencoded payloads: never supported, whatever its value. Without `crit` (which
        # RFC 7797 requires) a verifier that ignores it would check another payload than the signer meant.
        raise TokenRejected(Reason.MALFORMED)
    if "kid" in header and (not isinstance(header["kid"], str) or len(header["kid"]) > MAX_KID_LENGTH):
        raise TokenRejected(Reason.MALFORMED)
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    return ParsedJwt(header, claims, signing_input, signature)
