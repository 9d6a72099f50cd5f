"""The product's registries for config validation, and the one-call entry points that use them.

`config/` sits below `policy/`, `tokens/`, `context` and `routes`: it validates by asking a
`config.registry.Registries` it is handed. This module builds that value from the real engines and
key loaders, and is what callers import: `load_config(path)`, `parse_config(text)`, ...
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from authz_service.config import validate
from authz_service.config.model import Config, PolicyConfig, StaticKey
from authz_service.config.registry import Registries, Rejected
from authz_service.config.validate import read_config_text
from authz_service.context import strip_empty
from authz_service.denials import parse_responses
from authz_service.identity_token import parse_identity_token
from authz_service.policy import ENGINES, RULE_FIELDS, unknown_engine
from authz_service.routes import with_aidbox_references
from authz_service.tokens.dpop import DPOP_ALGORITHMS
from authz_service.tokens.keys import HMAC_MIN_BYTES, KTY_ALGORITHMS, MAX_KID_LENGTH, BadKey, load_static_key

_KEY_FIELDS = frozenset({"kty", "alg", "kid", "format", "pub", "k", "use"})


def static_key(raw: Mapping[str, Any]) -> StaticKey:
    """One `jwt.keys` entry, field by field: {kty, alg, format: PEM|plain, pub | k, kid?}; BadKey names the field."""
    kty = raw.get("kty")
    if not isinstance(kty, str) or kty.upper() not in KTY_ALGORITHMS:
        raise BadKey("kty", f"must be one of RSA, EC, OKP, OCT, got {kty!r}")
    kty = kty.upper()
    alg = raw.get("alg")
    if not isinstance(alg, str) or alg not in KTY_ALGORITHMS[kty]:
        allowed = ", ".join(sorted(KTY_ALGORITHMS[kty]))
        raise BadKey("alg", f"must be one of {allowed} for kty {kty}, got {alg!r}")
    kid = raw.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH):
        raise BadKey("kid", f"must be a string of 1 to {MAX_KID_LENGTH} characters")
    fmt = raw.get("format", "plain" if kty == "OCT" else "PEM")
    extras = sorted(str(name) for name in raw if name not in _KEY_FIELDS)
    if extras:
        raise BadKey(extras[0], "is not a known key field")
    if kty == "OCT":
        if fmt != "plain":
            raise BadKey("format", f"must be plain for kty OCT, got {fmt!r}")
        secret = raw.get("k")
        if not isinstance(secret, str) or not secret:
            raise BadKey("k", "is required for kty OCT (the shared secret)")
        return StaticKey(kty, alg, kid, secret=secret.encode())
    if fmt != "PEM":
        raise BadKey("format", f"must be PEM for kty {kty}, got {fmt!r}")
    pem = raw.get("pub")
    if not isinstance(pem, str) or "-----BEGIN" not in pem:
        raise BadKey("pub", "is required: a PEM public key or certificate")
    return StaticKey(kty, alg, kid, pem=pem)


def _loaded_key(raw: Mapping[str, Any]) -> StaticKey:
    """A static key checked and loaded exactly as the introspector will load it."""
    try:
        spec = static_key(raw)
        load_static_key(spec)
    except BadKey as err:
        raise Rejected(err.field, err.message) from err
    return spec


def _stored_resource(raw: Mapping[str, Any]) -> dict[str, Any]:
    # Stored as policies see it, once at load: empty values removed, references also as
    # {resourceType, id} (Aidbox's `.role.0.links.practitioner.id`). A plain dict on purpose:
    # jsonschema only treats dicts as objects, so a read-only proxy would skip `properties`.
    stored: dict[str, Any] = with_aidbox_references(strip_empty(raw))
    return stored


def _identity_token(raw: Mapping[str, Any]) -> tuple[str, object]:
    parsed = parse_identity_token(raw)
    return parsed.header, parsed


def _responses(raw: Mapping[str, Any], token_params: Collection[str]) -> object:
    return parse_responses(raw, token_params=token_params)


REGISTRIES = Registries(
    engines=ENGINES,
    rule_fields=RULE_FIELDS,
    unknown_engine=unknown_engine,
    static_key=_loaded_key,
    hmac_min_bytes=HMAC_MIN_BYTES,
    stored_resource=_stored_resource,
    responses=_responses,
    identity_token=_identity_token,
    dpop_algorithms=DPOP_ALGORITHMS,
)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand (from env, default os.environ) and validate a config file; ConfigError listing every problem."""
    return validate.load_config(path, REGISTRIES, env)


def parse_config(text: str, env: Mapping[str, str] | None = None) -> Config:
    """Validate config text (YAML); ConfigError listing every problem."""
    return validate.parse_config(text, REGISTRIES, env)


def validate_config(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """A Config from a raw mapping; `${VAR}` is expanded from env unless env is None."""
    return validate.validate_config(raw, REGISTRIES, env)


def validate_policies(raw: Any, introspector_ids: Iterable[str]) -> tuple[PolicyConfig, ...]:
    """AccessPolicy resources on their own (test-policy's "try these"), checked as in a config."""
    return validate.validate_policies(raw, introspector_ids, REGISTRIES)


__all__ = [
    "REGISTRIES",
    "load_config",
    "parse_config",
    "read_config_text",
    "static_key",
    "validate_config",
    "validate_policies",
]
