"""The dev identity provider (authz_service.devstack.idp.DevIdentityProvider) in its own process, plus
the token material the benchmark needs.

`python -m authz_service.devstack.idp` serves JWKS and introspection, but its keys and opaque tokens live
inside that process, so nothing outside it can mint a token it accepts. This wrapper runs the same
DevIdentityProvider, mints every token the scenarios use, issues the opaque tokens (the pool's,
each for a user of its own), writes them to files, and then serves until SIGTERM (in its own process, so its CPU is not the load
generator's or the service's).

    python bench/idp_server.py --out DIR [--opaque N] [--ttl S]
    # prints {"material": "DIR/material.json", ...} once listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric import ec

from authz_service.devstack.idp import DevIdentityProvider


def pool_claims(number: int) -> dict[str, Any]:
    """The introspection answer of pooled token `number`: a user of its own, with a UUID-shaped id
    as Keycloak and most IdPs issue (the other members are the dev IdP's, the same for all)."""
    return {"sub": str(uuid.UUID(int=number + 1, version=4))}


async def serve(out: Path, opaque: int, ttl: int) -> None:
    idp = DevIdentityProvider()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with idp:
        stranger = ec.generate_private_key(ec.SECP256R1())
        tokens = {
            "hs256": idp.mint(alg="HS256", ttl=ttl),
            "rs256": idp.mint(alg="RS256", ttl=ttl),
            "es256": idp.mint(alg="ES256", ttl=ttl),
            # The IdP's kid, signed by another P-256 key: a well-formed token whose signature fails.
            "es256_bad_signature": idp.mint(alg="ES256", ttl=ttl, key=stranger),
            "hs256_reader": idp.mint({"roles": ["reader"], "email": "user-1@example.com"}, alg="HS256", ttl=ttl),
            # Expired an hour ago (far beyond any leeway): refused however fast the service must be.
            "es256_expired": idp.mint(alg="ES256", ttl=-3600),
            "opaque": idp.issue_opaque(ttl=ttl),
        }
        pool = out / "opaque-tokens.txt"
        with pool.open("w") as handle:
            for number in range(opaque):
                # Each pooled token belongs to its own user, as in a real cache of many users:
                # every cached entry then holds its own user id, claims and ready-made headers.
                handle.write(idp.issue_opaque(pool_claims(number), ttl=ttl) + "\n")
        material = {
            "issuer": idp.issuer,
            "jwks_uri": idp.jwks_uri,
            "jwks": idp.jwks(),
            "introspection_url": idp.introspection_url,
            "introspection_authorization": idp.introspection_authorization,
            "hmac_secret": idp.hmac_secret,
            "pem": {"RS256": idp.public_pem("RS256"), "ES256": idp.public_pem("ES256")},
            "tokens": tokens,
            "opaque_pool": str(pool),
            "opaque_pool_size": opaque,
        }
        path = out / "material.json"
        path.write_text(json.dumps(material, indent=1))
        sys.stdout.write(json.dumps({"material": str(path), "url": idp.url}) + "\n")
        sys.stdout.flush()
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--opaque", type=int, default=0, help="distinct opaque tokens to issue")
    parser.add_argument("--ttl", type=int, default=3600, help="token lifetime, seconds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.out, args.opaque, args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
