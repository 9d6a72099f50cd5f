"""docs/identity-providers.md's snippets, each run against a local server laid out like the provider.

The emulators reproduce what each provider documents and what matters to a verifier: where the
discovery document and the keys live, the exact `issuer` (Auth0's trailing slash), the signing
algorithm, JWKs without `alg` (Entra) and the header a token arrives in (IAP). The snippets are
read from the doc itself, so the doc cannot drift from what works.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authz_service.devstack.localhttp import LocalHttpServer
from authz_service.registries import validate_config
from tests.harness import start_harness

DOC = Path(__file__).resolve().parents[2] / "docs" / "identity-providers.md"
ENV = {
    "KEYCLOAK_REALM": "shop",
    "KEYCLOAK_AUDIENCE": "orders-api",
    "AUTH0_API_IDENTIFIER": "https://api.example.com",
    "ENTRA_TENANT_ID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
    "ENTRA_API_CLIENT_ID": "6e74172b-be56-4843-9ff4-e66a39bb12e3",
    "GCP_PROJECT_NUMBER": "123456789012",
    "IAP_BACKEND_SERVICE_ID": "9876543210",
}


# Generated once, at import: RSA key generation would block the event loop of a test for ~0.2 s.
_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _b64(number: int, size: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes(size, "big")).rstrip(b"=").decode()


@dataclass
class Provider:
    """How one provider lays out its URLs and signs its tokens."""

    name: str
    doc_host: str  # the host the doc's snippet uses, replaced by the emulator's
    issuer: Callable[[str], str]  # base URL -> iss
    discovery_path: Callable[[str], str | None]  # iss -> path of the document (None: no discovery)
    jwks_path: Callable[[str], str]  # iss -> path of the key set
    alg: str
    audience: str
    jwk_has_alg: bool = True
    header: str | None = None  # the token's header, when not Authorization: Bearer


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[1].partition("/")[2]


PROVIDERS = [
    Provider(
        "keycloak",
        "https://keycloak.example.com",
        lambda base: f"{base}/realms/{ENV['KEYCLOAK_REALM']}",
        lambda iss: _path(iss) + "/.well-known/openid-configuration",
        lambda iss: _path(iss) + "/protocol/openid-connect/certs",
        "RS256",
        ENV["KEYCLOAK_AUDIENCE"],
    ),
    Provider(
        "auth0",
        "https://my-tenant.us.auth0.com",
        lambda base: f"{base}/",
        lambda iss: "/.well-known/openid-configuration",
        lambda iss: "/.well-known/jwks.json",
        "RS256",
        ENV["AUTH0_API_IDENTIFIER"],
    ),
    Provider(
        "okta",
        "https://dev-123456.okta.com",
        lambda base: f"{base}/oauth2/default",
        lambda iss: "/oauth2/default/.well-known/openid-configuration",
        lambda iss: "/oauth2/default/v1/keys",
        "RS256",
        "api://default",
    ),
    Provider(
        "entra",
        "https://login.microsoftonline.com",
        lambda base: f"{base}/{ENV['ENTRA_TENANT_ID']}/v2.0",
        lambda iss: f"/{ENV['ENTRA_TENANT_ID']}/v2.0/.well-known/openid-configuration",
        lambda iss: f"/{ENV['ENTRA_TENANT_ID']}/discovery/v2.0/keys",
        "RS256",
        ENV["ENTRA_API_CLIENT_ID"],
        jwk_has_alg=False,
    ),
    Provider(
        "iap",
        "https://www.gstatic.com",
        lambda base: "https://cloud.google.com/iap",
        lambda iss: None,
        lambda iss: "/iap/verify/public_key-jwk",
        "ES256",
        f"/projects/{ENV['GCP_PROJECT_NUMBER']}/global/backendServices/{ENV['IAP_BACKEND_SERVICE_ID']}",
        header="x-goog-iap-jwt-assertion",
    ),
]


class Emulator(LocalHttpServer):
    """One provider's discovery document and key set, at the provider's paths."""

    def __init__(self, provider: Provider) -> None:
        super().__init__()
        self.provider = provider
        self.kid = uuid.uuid4().hex[:16]
        self.key: Any = _EC_KEY if provider.alg == "ES256" else _RSA_KEY
        self.hits: list[str] = []

    @property
    def issuer(self) -> str:
        return self.provider.issuer(self.url)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        return app

    def _jwk(self) -> dict[str, Any]:
        public = self.key.public_key().public_numbers()
        jwk: dict[str, Any] = {"kid": self.kid, "use": "sig"}
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            jwk.update(kty="EC", crv="P-256", x=_b64(public.x, 32), y=_b64(public.y, 32))
        else:
            jwk.update(kty="RSA", n=_b64(public.n, 256), e=_b64(public.e, 3), x5t=self.kid)
        if self.provider.jwk_has_alg:
            jwk["alg"] = self.provider.alg
        return jwk

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        provider = self.provider
        if request.path == provider.discovery_path(self.issuer):
            jwks_uri = self.url + provider.jwks_path(self.issuer)
            return web.json_response({"issuer": self.issuer, "jwks_uri": jwks_uri, "token_endpoint": self.url + "/t"})
        if request.path == provider.jwks_path(self.issuer):
            return web.json_response({"keys": [self._jwk()]})
        return web.json_response({"error": "not_found"}, status=404)

    def mint(self, sub: str) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.provider.audience, "sub": sub, "iat": now, "exp": now + 300}
        return jwt.encode(claims, self.key, algorithm=self.provider.alg, headers={"kid": self.kid})


def snippets() -> dict[str, str]:
    """The YAML blocks of the doc marked `# provider: NAME`."""
    found = {}
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S):
        match = re.match(r"# provider: (\w+)\n", block)
        if match:
            found[match.group(1)] = block
    return found


def test_every_provider_in_the_doc_has_a_tested_snippet() -> None:
    assert sorted(snippets()) == sorted(p.name for p in PROVIDERS)


@pytest.fixture(params=PROVIDERS, ids=[p.name for p in PROVIDERS])
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[Emulator]:
    async with Emulator(request.param) as server:
        yield server


async def test_the_snippet_accepts_the_providers_tokens(emulator: Emulator) -> None:
    provider = emulator.provider
    text = snippets()[provider.name].replace(provider.doc_host, emulator.url)
    introspectors = yaml.safe_load(text)
    config = validate_config(
        {
            "server": {"grpc_address": "127.0.0.1:0", "admin_address": None},
            "authentication_only": True,  # every valid token allowed: the snippets are about tokens
            "introspectors": introspectors,
        },
        ENV,
    )
    harness = await start_harness(config)
    try:
        token = emulator.mint("user-42")
        headers = {provider.header: token} if provider.header else {"authorization": f"Bearer {token}"}
        answer = await harness.check(headers=headers)
        assert answer.allowed, (answer.http_status, answer.response.status.message)
        assert answer.headers["x-user-id"] == "user-42"
        # The wrong audience is refused: the snippet pins the API, not just the provider.
        wrong = jwt.encode(
            {**jwt.decode(token, options={"verify_signature": False}), "aud": "someone-else"},
            emulator.key,
            algorithm=provider.alg,
            headers={"kid": emulator.kid},
        )
        wrong_headers = {provider.header: wrong} if provider.header else {"authorization": f"Bearer {wrong}"}
        refused = await harness.check(headers=wrong_headers)
        assert refused.http_status == 401
        assert refused.response.status.message == "bad_audience"
        expected = [provider.jwks_path(emulator.issuer)]
        document = provider.discovery_path(emulator.issuer)
        if document is not None:
            expected.insert(0, document)
        assert emulator.hits == expected
    finally:
        await harness.close()
