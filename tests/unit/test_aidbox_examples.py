"""Aidbox's own documented AccessPolicy examples, pasted verbatim, decided by our implementation.

The examples live as data in tests/aidbox/*.yaml, one file per documentation page or group of
pages (in this order: the matcho DSL reference, access-policies.md, the tutorials, the bulk API);
this module only loads them and runs the checks they list.

Every example is the YAML (or JSON) exactly as Aidbox's documentation prints it
(github.com/HealthSamurai/aidbox-docs, commit 808a85a), a block scalar under `texts:` with a
`source:` naming the file and section. Paths are relative to that repository's docs/ directory,
and `T/` is tutorials/security-access-control-tutorials/. Each case asserts the answer the
documentation gives, or, where the documentation only states the policy's intent ("allows a
practitioner to read their patients"), the answer that intent means. The documentation text is
never edited in place. Where it must change before it can run here, a world's item says how
(`replace`, `pick`, `set`, ...) and a `why:` or a comment next to it says why:

- Aidbox gives a resource without an `id` one of its own (`POST /AccessPolicy`), or takes the id
  from the URL (`PUT /AccessPolicy/<id>`). An item's `id` is added only when the text has none.
- By design (SPEC), we do not support: `engine: sql` (a config error); policies that read the request
  body (`resource`, `body`: an ext_authz service never sees it, so such a policy does not match); `session`
  (an ext_authz service has no sessions: `.session.role...` resolves to nothing, and the tutorial's
  policy is ported to the top-level `role`); YAML duplicate keys (our strict loader refuses them).
- Callers authenticate with a JWT here (`sub` = the User's id, `client_id` = the Client's id). Aidbox's
  tutorials use its sessions and Basic auth instead.

Where a page's own example cannot give the answer the page states (a schema that nests a keyword
one level too high, `request-method: GET` against Aidbox's lower-case method, a `uri` that is not
the one requested), the case asserts what the policy as written decides, here as in Aidbox, and
its comment names the doc error. Unresolved `.path` references never match here (docs/matcho.md),
where the best-practices page says Aidbox matches two missing values; that case asserts ours.

A file holds `texts`, `worlds` (what the service is configured with), and the checks:
- `decisions`: a request (`request: METHOD path`, by `sub` (default user-1) with `claims`, or by a
  documented JWT `payload`, from `iss`; `anonymous: true` sends no credentials, `token` or
  `token_text` a token as given) and `expect`: `allow` (by the world's one policy, or by `policy`),
  `deny` (403; 401 without credentials), or an outcome with its `reason`. A `world` list runs the
  case in each world.
- `refusals`: config texts and a part of the error they are refused with.
- `matcho`: `matches(pattern, value[, context])`; a string operand is (flow) YAML text, a mapping
  with `text` is an item as in a world, any other value is itself.
- `contexts`: parts of the request context the policies see (`equals`, `startswith`, dotted paths).
No world is empty of policies, so none needs `authentication_only`.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from authz_service.config import yamlload
from authz_service.config.model import Config
from authz_service.engine import Engine, build_engine
from authz_service.errors import ConfigError
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.policy.matcho import matches
from authz_service.policytest import PolicyTestError, parse_policy_test, run_policy_test
from authz_service.registries import parse_config
from authz_service.tokens.cache import CacheFactory
from tests.unit.fakes import FakeIdpClient, hs_token

FAR_FUTURE = 4_000_000_000  # exp of minted tokens: the introspectors read the real clock
ISS = "https://idp.example"
SECRET = "an-hmac-secret-of-at-least-32-bytes!"
KEYCLOAK_ISS = "http://localhost:8180/realms/myrealm"
DENIED = None  # the expected answer of a case no policy allows (403; 401 without a token)
ALLOWED = "(the one policy)"  # the expected answer of a case the world's only policy allows

DATA = Path(__file__).resolve().parent.parent / "aidbox"
GROUPS: list[tuple[str, dict[str, Any]]] = [
    (path.stem.split("-", 1)[1], yamlload.load(path.read_text(encoding="utf-8")))
    for path in sorted(DATA.glob("*.yaml"))
]


def load_texts() -> dict[str, str]:
    """Every file's texts by name (one namespace: a world may use another page's text)."""
    texts: dict[str, str] = {}
    for _, group in GROUPS:
        for name, entry in group.get("texts", {}).items():
            assert name not in texts, f"text {name} defined twice"
            assert entry.keys() == {"source", "text"}, name
            texts[name] = entry["text"]
    return texts


TEXTS = load_texts()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as Aidbox's `PATCH` applies a mapping."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def build(item: Any) -> list[dict[str, Any]]:
    """The resources one item of a world stands for: a literal mapping, or a text (by name, or
    `{text: NAME}`) read by the config's own strict loader after `replace` and `split` (its n-th
    blank-line separated part), then `pick` (a path into it), `select` (the list items with these
    fields), `id` (only when it has none: Aidbox's), `set` (fields replaced) and `patch` (a text)."""
    spec: Mapping[str, Any] = {"text": item} if isinstance(item, str) else item
    if "text" not in spec:
        return [dict(spec)]
    text = TEXTS[spec["text"]]
    for old, new in spec.get("replace", []):
        assert old in text, f"{spec['text']} has no {old!r}"
        text = text.replace(old, new)
    if "split" in spec:
        text = text.split("\n\n")[spec["split"]]
    value = yamlload.load(text)
    for key in spec.get("pick", []):
        value = value[key]
    wanted = spec.get("select")
    values = [v for v in value if wanted.items() <= v.items()] if wanted else [value]
    built = []
    for one in values:
        assert isinstance(one, dict)
        resource = {"id": spec["id"], **one} if "id" in spec else dict(one)
        resource.update(spec.get("set", {}))
        if "patch" in spec:
            resource = merge_patch(resource, yamlload.load(TEXTS[spec["patch"]]))
        built.append(resource)
    return built


def build_all(items: list[Any]) -> tuple[Mapping[str, Any], ...]:
    return tuple(resource for item in items for resource in build(item))


INTROSPECTORS: tuple[Mapping[str, Any], ...] = (
    {"id": "idp", "type": "jwt", "jwt": {"iss": ISS, "secret": SECRET}},
    # Its 11-byte secret is accepted with a warning (SPEC: Aidbox's examples use short ones).
    *build("EXTERNAL_AUTH_SERVER"),
    # For keycloak-auto-create-user.md: its TokenIntrospector fetches keys from a Keycloak, this one
    # has a secret, with the same issuer.
    {"id": "keycloak", "type": "jwt", "jwt": {"iss": KEYCLOAK_ISS, "secret": SECRET}},
)


@dataclass(frozen=True)
class World:
    """What the service is configured with: AccessPolicy, User and Role resources (as loaded)."""

    policies: tuple[Mapping[str, Any], ...]
    users: tuple[Mapping[str, Any], ...] = ()
    roles: tuple[Mapping[str, Any], ...] = ()
    introspectors: tuple[Mapping[str, Any], ...] = INTROSPECTORS
    introspection: Mapping[str, Any] | None = None  # what an opaque introspection endpoint answers

    def config(self) -> Config:
        raw = {
            "introspectors": list(self.introspectors),
            "policies": list(self.policies),
            "users": list(self.users),
            "roles": list(self.roles),
        }
        return parse_config(json.dumps(raw), {})

    def engine(self) -> Engine:
        config = self.config()
        return build_engine(config, FakeIdpClient(self.introspection), CacheFactory(config.cache))

    def secret(self, iss: str) -> bytes:
        [secret] = [i["jwt"]["secret"] for i in self.introspectors if i.get("jwt", {}).get("iss") == iss]
        return str(secret).encode()


def world(spec: Mapping[str, Any]) -> World:
    introspectors = build_all(spec["introspectors"]) if "introspectors" in spec else INTROSPECTORS
    return World(
        build_all(spec["policies"]),
        build_all(spec.get("users", [])),
        build_all(spec.get("roles", [])),
        introspectors,
        spec.get("introspection"),
    )


WORLDS = {name: world(spec) for _, group in GROUPS for name, spec in group.get("worlds", {}).items()}


@dataclass(frozen=True)
class Ask:
    """One request and who sends it: a JWT for `sub` from `iss` with more `claims`, or `token`
    as given, or (sub None) no credentials at all."""

    method: str
    path: str
    sub: str | None = "user-1"
    claims: Mapping[str, Any] = field(default_factory=dict)
    iss: str = ISS
    token: str | None = None

    def request(self, where: World) -> HttpRequest:
        token = self.token
        if token is None and self.sub is not None:
            claims = {"iss": self.iss, "sub": self.sub, "exp": FAR_FUTURE, **self.claims}
            token = hs_token(claims, where.secret(self.iss))
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        return HttpRequest(method=self.method, path=self.path, host="aidbox.example", headers=headers)


def ask(case: Mapping[str, Any]) -> Ask:
    method, path = case["request"].split(" ", 1)
    sub: str | None = "user-1"
    claims: dict[str, Any] = {}
    if "payload" in case:  # (sub, the other claims) of a documented JWT payload; Ask sets iss and exp
        claims = json.loads(TEXTS[case["payload"]])
        del claims["exp"], claims["iss"]
        sub = claims.pop("sub")
    sub = None if case.get("anonymous") else case.get("sub", sub)
    token = TEXTS[case["token_text"]].strip() if "token_text" in case else case.get("token")
    return Ask(method, path, sub, {**claims, **case.get("claims", {})}, case.get("iss", ISS), token)


def expected(case: Mapping[str, Any]) -> str | None:
    """The id of the policy that allows the request, ALLOWED, or DENIED."""
    assert case["expect"] in ("allow", "deny"), case
    return DENIED if case["expect"] == "deny" else case.get("policy", ALLOWED)


async def decide(where: World, ask: Ask) -> Decision:
    return await where.engine().authorizer.check(ask.request(where))


async def check(where: World, ask: Ask, expected: str | None) -> None:
    if expected == ALLOWED:
        [policy] = where.policies
        expected = policy["id"]
    decision = await decide(where, ask)
    if expected is None:
        anonymous = ask.sub is None and ask.token is None
        wanted = Outcome.UNAUTHENTICATED if anonymous else Outcome.FORBIDDEN
        assert decision.outcome is wanted, f"{ask} was allowed by {decision.policy!r}"
    else:
        assert decision.outcome is Outcome.ALLOW, f"{ask}: {decision.outcome.value} ({decision.reason.label})"
        assert decision.policy == expected


def cases(kind: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(a readable id, the case) of every case of this kind, file by file."""
    for group, doc in GROUPS:
        for case in doc.get(kind, []):
            yield f"{group}/{case['id']}", case


def in_worlds(kind: str) -> Iterator[Any]:
    for ident, case in cases(kind):
        names = case["world"] if isinstance(case["world"], list) else [case["world"]]
        for name in names:
            suffix = f"-{name}" if isinstance(case["world"], list) else ""
            yield pytest.param(WORLDS[name], ask(case), case, id=ident + suffix)


KEYS = {  # what each kind of case may say (a misspelt key would silently change a case)
    "decisions": {"id", "world", "request", "sub", "anonymous", "payload", "claims", "iss", "token", "token_text"}
    | {"expect", "policy", "reason"},
    "refusals": {"id", "policies", "items_of", "introspectors", "error"},
    "matcho": {"id", "pattern", "value", "context", "matches"},
    "contexts": {"id", "world", "request", "sub", "payload", "claims", "iss", "equals", "startswith"},
}


def test_cases_are_well_formed() -> None:
    seen = [ident for kind in KEYS for ident, _ in cases(kind)]
    assert len(seen) == len(set(seen)), sorted(i for i in seen if seen.count(i) > 1)
    for kind, allowed in KEYS.items():
        for ident, case in cases(kind):
            assert case.keys() <= allowed, (ident, case.keys() - allowed)
    for _, group in GROUPS:
        for name, spec in group.get("worlds", {}).items():
            assert spec.keys() <= {"policies", "users", "roles", "introspectors", "introspection"}, name
            items = [item for key in ("policies", "users", "roles", "introspectors") for item in spec.get(key, [])]
            for item in items:
                steps = {"text", "replace", "split", "pick", "select", "id", "set", "patch"}
                assert not isinstance(item, dict) or "text" not in item or item.keys() <= steps, (name, item)


@pytest.mark.parametrize(("where", "ask", "case"), list(in_worlds("decisions")))
async def test_decision(where: World, ask: Ask, case: Mapping[str, Any]) -> None:
    if "reason" in case:
        decision = await decide(where, ask)
        assert (decision.outcome, decision.reason) == (Outcome(case["expect"]), Reason[case["reason"].upper()])
    else:
        await check(where, ask, expected(case))


def list_items(texts: list[str]) -> str:
    """These texts as the items of a YAML list, each exactly as written."""
    return "".join("  - " + textwrap.indent(text, "    ")[4:] for text in texts)


def refused_text(case: Mapping[str, Any]) -> str:
    """The config file of a refusal: its `policies` as written and each item of `items_of` (as
    JSON), with the usual introspectors; or (alone) its `introspectors` as written."""
    if "introspectors" in case:
        return "introspectors:\n" + list_items([TEXTS[name] for name in case["introspectors"]])
    texts = [TEXTS[name] for name in case.get("policies", [])]
    texts += [json.dumps(item) + "\n" for item in yamlload.load(TEXTS[case["items_of"]])] if "items_of" in case else []
    return f"introspectors: {json.dumps(list(INTROSPECTORS))}\npolicies:\n{list_items(texts)}"


@pytest.mark.parametrize("case", [pytest.param(case, id=ident) for ident, case in cases("refusals")])
def test_refusal(case: Mapping[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(refused_text(case), {})
    assert case["error"] in str(caught.value)


def operand(spec: Any) -> Any:
    if isinstance(spec, str):
        return yamlload.load(spec)
    if isinstance(spec, dict) and "text" in spec:
        [value] = build(spec)
        return value
    return spec


@pytest.mark.parametrize("case", [pytest.param(case, id=ident) for ident, case in cases("matcho")])
def test_matcho(case: Mapping[str, Any]) -> None:
    context = [operand(case["context"])] if "context" in case else []
    assert matches(operand(case["pattern"]), operand(case["value"]), *context) is case["matches"]


@pytest.mark.parametrize(("where", "ask", "case"), list(in_worlds("contexts")))
async def test_context(where: World, ask: Ask, case: Mapping[str, Any]) -> None:
    engine = where.engine()
    request = ask.request(where)
    decision = await engine.authorizer.check(request)
    context = engine.authorizer.context(request, decision.identity)

    def at(path: str) -> Any:
        value: Any = context
        for key in path.split("."):
            value = value[key]
        return value

    for path, value in case.get("equals", {}).items():
        assert at(path) == value, path
    for path, prefix in case.get("startswith", {}).items():
        assert at(path).startswith(prefix), path


def test_short_introspector_secret_is_a_warning() -> None:
    # T/set-up-token-introspection.md: the short secret is accepted, with a warning (SPEC).
    warnings = WORLDS["issuer"].config().warnings
    assert any("external-auth-server" in warning and "jwt.secret" in warning for warning in warnings)


def test_debug_test_policy_body() -> None:
    # T/debug-access-control.md: as printed, its `-- or` lines are not YAML (our API answers 400).
    text = TEXTS["TEST_POLICY_BODY"]
    with pytest.raises(yamlload.YamlError) as caught:
        yamlload.load(text)
    assert caught.value.syntax
    # Without them: our test-policy takes the user and the client from the token, as Check does,
    # and refuses a request that names them (422).
    body = yamlload.load("\n".join(line for line in text.split("\n") if not line.strip().startswith("--")))
    with pytest.raises(PolicyTestError) as refused:
        parse_policy_test(body, WORLDS["examples-1"].config())
    assert refused.value.status == 422
    assert any(problem.startswith("request.user:") for problem in refused.value.problems)
    assert any(problem.startswith("request.client:") for problem in refused.value.problems)


async def test_debug_test_policy_request_object() -> None:
    # The answer's request object: uri, request-method and the router's `params: {resource/type: Patient}`.
    where = WORLDS["examples-1"]
    engine = where.engine()
    config = where.config()
    token = Ask("GET", "/fhir/Patient").request(where).headers["authorization"]
    test = parse_policy_test(
        {"request": {"uri": "/fhir/Patient", "request-method": "get", "headers": {"authorization": token}}}, config
    )
    answer = await run_policy_test(engine.authorizer, config, test)
    documented = yamlload.load(TEXTS["TEST_POLICY_ANSWER"])["request"]
    for name in ("uri", "request-method", "params"):
        assert answer["context"][name] == documented[name]
    assert answer["decision"] == "allow"
    assert answer["policy"] == "allow-all"
