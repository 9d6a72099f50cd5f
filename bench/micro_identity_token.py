"""What the identity token (`response.identity_token`, docs/responses.md) costs an allow.

For each alg (ES256, EdDSA, RS256 2048-bit), `IdentityTokenMinter.token_for`:

- sign_us: a mint, every call a new credential (a new cache key), so every call signs;
- hit_us: the same credential again within ttl/2: the cached token, a dict lookup;

and the gRPC allow answer around it, `envoy.ResponseBuilder.encode` of one repeated allow:

- encode_us: without an identity token (today's allow, from its memo);
- encode_token_us: with one (the minter's hit, then the answer's memo, keyed by the token).

Each figure is µs per call of a time-bounded loop (at least --seconds per round, whole batches),
the median of --rounds rounds, in CPU time of this thread (time.thread_time), so other processes
on the machine blur it less than wall time would.

    python bench/micro_identity_token.py --rounds 5     # prints one JSON line per alg
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from authz_service.config.model import ResponseConfig
from authz_service.envoy import ResponseBuilder
from authz_service.identity_token import IdentityTokenMinter, parse_identity_token
from authz_service.model import Decision, Identity, Outcome, Reason

ALGS = ("ES256", "EdDSA", "RS256")
CLAIMS = {"sub": "2c9a1f4e-7b3d-4e8a-9f10-3b5c7d9e1f20", "email": "alice@example.com", "roles": ["clerk", "viewer"]}


def private_pem(alg: str) -> str:
    key: Any
    if alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem: bytes = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return pem.decode()


def minter(alg: str) -> IdentityTokenMinter:
    config = parse_identity_token(
        {
            "issuer": "https://authz.example.com",
            "audience": "orders-api",
            "claims": ["email", "roles"],
            "keys": [{"kid": "k1", "alg": alg, "private_pem": private_pem(alg)}],
        }
    )
    # As many entries as the sign loop makes keys: no eviction cost in the hit figure either way.
    return IdentityTokenMinter(config, max_entries=1 << 20)


def per_call_us(call: Callable[[int], object], seconds: float, batch: int) -> float:
    """µs of thread CPU per call, over whole batches until `seconds` have passed."""
    calls = 0
    start = time.thread_time()
    deadline = start + seconds
    while True:
        for i in range(batch):
            call(calls + i)
        calls += batch
        now = time.thread_time()
        if now >= deadline:
            return (now - start) / calls * 1e6


def median_us(call: Callable[[int], object], rounds: int, seconds: float, batch: int) -> float:
    return round(statistics.median(per_call_us(call, seconds, batch) for _ in range(rounds)), 2)


def measure(alg: str, rounds: int, seconds: float) -> dict[str, Any]:
    signer = minter(alg)
    exp = time.time() + 3600

    def sign(i: int) -> str:
        return signer.token_for("alice", CLAIMS, "reports", "keycloak", ("sign", i), exp)

    def hit(i: int) -> str:
        return signer.token_for("alice", CLAIMS, "reports", "keycloak", "hit", exp)

    hit(0)
    identity = Identity("alice", CLAIMS, "keycloak", "jwt", headers=("x-user-id", "alice"))
    decision = Decision(Outcome.ALLOW, Reason.ALLOWED, identity, identity.headers, "reports", introspector="keycloak")
    plain = ResponseBuilder(ResponseConfig())
    with_token = ResponseBuilder(
        ResponseConfig(identity_token_header="x-identity-token", identity_token=signer.config), minter=signer
    )
    token = signer.token_for("alice", CLAIMS, "reports", "keycloak", "hit", exp)
    return {
        "alg": alg,
        "sign_us": median_us(sign, rounds, seconds, 20 if alg == "RS256" else 100),
        "hit_us": median_us(hit, rounds, seconds, 10_000),
        "encode_us": median_us(lambda i: plain.encode(decision), rounds, seconds, 10_000),
        "encode_token_us": median_us(lambda i: with_token.encode(decision), rounds, seconds, 10_000),
        "token_bytes": len(token),
        "rounds": rounds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per round and figure")
    parser.add_argument("--algs", nargs="*", default=list(ALGS), choices=ALGS)
    args = parser.parse_args()
    for alg in args.algs:
        print(json.dumps(measure(alg, args.rounds, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
