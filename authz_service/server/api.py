"""The resource API, Aidbox's REST workflow on the admin listener (docs/resources.md).

`PUT|GET|DELETE /<Type>/<id>`, `GET /<Type>` and a bulk `PUT /` for TokenIntrospector,
AccessPolicy, User and Role, and `POST /auth/test-policy` (policytest.py) behind the same token.
Bodies are YAML or JSON, read strictly; every change is validated with the config file and the
rest of the store by the one config validator, persisted by the store, and applied (this
process, or every worker of a supervisor) before the answer. Errors are FHIR OperationOutcomes.
Every token of `api.token` / `api.tokens` names a writer; each resource a write changes is one
audit line (writer, resource, action, digests before and after: store/audit.py) and one count of
`authz_api_writes_total`. A policy written to allow every request is accepted, logged, and
answered with a warning (a `Warning` header; FHIR's `Prefer: return=OperationOutcome` for it as
the body). This module is only the HTTP shell: it parses, authorizes, plans and answers; the store
and the backend (`ApiBackend`) do the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from aiohttp import web
from multidict import CIMultiDict

from authz_service import strictjson
from authz_service.config import yamlload
from authz_service.config.model import ApiToken, Config
from authz_service.engine import Engine
from authz_service.errors import ConfigError
from authz_service.observe import ApiMetrics, redact
from authz_service.policytest import PolicyTestError, parse_policy_test, run_policy_test
from authz_service.store.audit import allows_everything, digest, secrets_changed
from authz_service.store.base import (
    KINDS,
    Change,
    Key,
    Resource,
    ResourceStore,
    Snapshot,
    StoreError,
    id_problem,
    key_text,
    normalized,
)
from authz_service.store.resources import ConfigFile, json_problem, without_secrets

log = logging.getLogger(__name__)

REALM = 'Bearer realm="authz-service"'
TEST_POLICY_PATH = "/auth/test-policy"
PARSE_IN_THREAD_BYTES = 64 * 1024  # larger bodies are parsed off the event loop
_ISSUE_CODES = {
    400: "structure",
    401: "login",
    404: "not-found",
    405: "not-supported",
    409: "conflict",
    413: "too-long",
    415: "not-supported",
    422: "invalid",
    500: "exception",
    503: "transient",
    504: "timeout",
    507: "no-store",
}


class ApiBackend(Protocol):
    """What the API writes through: the config file and store it validates against, and how a
    write becomes effective (this process applies it; a supervisor waits for its workers)."""

    @property
    def file(self) -> ConfigFile: ...

    @property
    def store(self) -> ResourceStore | None: ...

    def compose(self, resources: Mapping[Key, Resource]) -> Config: ...

    @property
    def write_floor(self) -> int | None:
        """The highest store change counter any process here decides with (a write lands above it)."""
        ...

    async def applied(self) -> tuple[int, str] | None:
        """None once the store's current content is what decides, else (HTTP status, why not)."""
        ...


class ApiError(Exception):
    """An answer other than success: status, and the diagnostics of its OperationOutcome."""

    def __init__(self, status: int, diagnostics: Sequence[str], headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.diagnostics = list(diagnostics)
        self.headers = dict(headers or {})
        super().__init__("; ".join(self.diagnostics))


def operation_outcome(
    diagnostics: Sequence[str], status: int = 422, severity: str = "error", warnings: Sequence[str] = ()
) -> dict[str, Any]:
    """FHIR's OperationOutcome: one issue per diagnostic, then one `warning` issue per warning."""
    code = "informational" if severity == "information" else _ISSUE_CODES.get(status, "processing")
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            *({"severity": severity, "code": code, "diagnostics": text} for text in diagnostics),
            *({"severity": "warning", "code": WARNING_CODE, "diagnostics": text} for text in warnings),
        ],
    }


# How check-config's warnings name a resource of each type (`introspector 'x': ...`).
_WARNING_SUBJECT = {"TokenIntrospector": "introspector", "AccessPolicy": "policy", "User": "user", "Role": "role"}
WARNING_CODE = "security"  # FHIR issue type of an accepted write that weakens access control


@dataclass(frozen=True, slots=True)
class Written:
    """One resource a write changed, as the audit line tells it."""

    key: Key
    action: str  # create, update, delete
    before: Resource | None
    after: Resource | None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write left: the store after it, what it changed, and what to warn its writer about."""

    snapshot: Snapshot
    written: list[Written]
    warnings: list[str]


class ResourceApi:
    """The handlers; `register` adds them to the admin server's application."""

    def __init__(
        self,
        writers: Sequence[ApiToken],
        backend: ApiBackend,
        max_body: int,
        engine: Callable[[], Awaitable[Engine]] | None = None,
        metrics: ApiMetrics | None = None,
    ) -> None:
        # Compared as digests: constant time, any length. Every writer's is compared on every request.
        self._writers = [(w.name, hashlib.sha256(w.token.encode()).digest()) for w in writers]
        self._metrics = metrics
        self._backend = backend
        self._engine = engine  # what test-policy decides with: the engine Check uses now
        self.max_body = max_body
        self._writes = asyncio.Lock()  # one write at a time in this process (the store serializes processes)

    def register(self, app: web.Application) -> None:
        """Every path not served otherwise (register after /healthz, /readyz, /metrics)."""
        app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            writer = self._authorize(request)
            if request.path == TEST_POLICY_PATH and self._engine is not None:
                if request.method != "POST":
                    raise ApiError(405, [f"{request.method} {TEST_POLICY_PATH} is not supported"], {"Allow": "POST"})
                return await self._test_policy(request, self._engine)
            kind, ident = _target(request)
            if kind is None:
                if request.method != "PUT":
                    raise ApiError(
                        405, [f"{request.method} / is not supported; PUT / applies a list"], {"Allow": "PUT"}
                    )
                return await self._bulk(request, writer)
            if ident is None:
                if request.method != "GET":
                    raise ApiError(405, [f"{request.method} /{kind} is not supported"], {"Allow": "GET"})
                return await self._list(kind)
            if request.method == "GET":
                return await self._read(kind, ident)
            if request.method == "PUT":
                return await self._put(request, kind, ident, writer)
            if request.method == "DELETE":
                return await self._delete(kind, ident, writer)
            raise ApiError(405, [f"{request.method} is not supported here"], {"Allow": "GET, PUT, DELETE"})
        except ApiError as err:
            return _answer(operation_outcome(err.diagnostics, err.status), err.status, err.headers)
        except StoreError as err:
            log.error("resource store error", extra={"fields": {"error": err.message}})
            return _answer(operation_outcome([err.message], err.status), err.status)
        except Exception as err:
            # Type only: a message could quote a body. Never a traceback to the client.
            log.error("internal error in the resource API: %s", type(err).__name__)
            return _answer(operation_outcome(["internal error; see the service log"], 500), 500)

    # -- requests ------------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> str:
        """The name of the writer whose token the request bears; ApiError 401 otherwise."""
        values = request.headers.getall("Authorization", [])
        scheme, _, given = values[0].partition(" ") if len(values) == 1 else ("", "", "")
        presented = hashlib.sha256(given.strip().encode()).digest()
        writer: str | None = None
        for name, expected in self._writers:
            # Every token compared, no early exit: the time taken says nothing of which one matched.
            if hmac.compare_digest(presented, expected) and writer is None:
                writer = name
        if scheme.lower() == "bearer" and given.strip() and writer is not None:
            return writer
        log.warning(
            "resource API request without a valid token",
            extra={"fields": {"method": request.method, "path": redact.path(request.path), "remote": request.remote}},
        )
        challenge = REALM + (', error="invalid_token"' if values else "")
        raise ApiError(401, ["this API needs Authorization: Bearer <api.token>"], {"WWW-Authenticate": challenge})

    async def _body(self, request: web.Request) -> Any:
        """The parsed body: at most max_body bytes (413 before reading more), YAML or JSON, strictly."""
        length = request.content_length
        if length is not None and length > self.max_body:
            raise ApiError(413, [f"the body is {length} bytes; at most {self.max_body} (api.max_body_bytes)"])
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(65536):
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, [f"the body is over {self.max_body} bytes (api.max_body_bytes)"])
            chunks.append(chunk)
        data = b"".join(chunks)
        media = request.content_type.lower()
        if media.startswith("multipart/"):
            raise ApiError(415, ["send the resource as YAML (text/yaml) or JSON (application/json)"])
        as_json = media == "application/json" or media.endswith("+json")
        if len(data) > PARSE_IN_THREAD_BYTES:
            value = await asyncio.to_thread(_parse, data, as_json)
        else:
            value = _parse(data, as_json)
        problem = json_problem(value)
        if problem is not None:
            raise ApiError(422, [f"the body: {problem}"])
        return value

    async def _put(self, request: web.Request, kind: str, ident: str, writer: str) -> web.Response:
        body = await self._body(request)
        resource = _resource(body, kind, ident, "the body")
        key = (kind, ident)
        self._refuse_file_resources([key])
        created: list[bool] = []

        def plan(current: Snapshot) -> list[Change]:
            created.append(key not in current.resources)
            return [Change(key, resource)]

        result = await self._write(plan, writer, f"PUT /{kind}/{ident}")
        status = 201 if created[-1] else 200
        headers: CIMultiDict[str] = CIMultiDict({"Location": f"/{kind}/{ident}"} if status == 201 else {})
        for warning in result.warnings:
            headers.add("Warning", _warning_header(warning))
        if result.warnings and _prefers_outcome(request):
            # FHIR's Prefer: return=OperationOutcome: the outcome (with the warnings) instead of the resource.
            lines = [f"{key_text(key)}: {'created' if status == 201 else 'updated'}"]
            return _answer(operation_outcome(lines, severity="information", warnings=result.warnings), status, headers)
        return _answer(without_secrets(kind, resource), status, headers)

    async def _delete(self, kind: str, ident: str, writer: str) -> web.Response:
        key = (kind, ident)
        self._refuse_file_resources([key])
        deleted: list[Resource] = []

        def plan(current: Snapshot) -> list[Change]:
            resource = current.resources.get(key)
            if resource is None:
                raise ApiError(404, [f"{key_text(key)} does not exist"])
            deleted.append(resource)
            return [Change(key, None)]

        await self._write(plan, writer, f"DELETE /{kind}/{ident}")
        return _answer(without_secrets(kind, deleted[-1]), 200)

    async def _bulk(self, request: web.Request, writer: str) -> web.Response:
        body = await self._body(request)
        if isinstance(body, dict) and body.get("resourceType") == "Bundle":
            entries = body.get("entry") or []
            body = (
                [e.get("resource") if isinstance(e, dict) else e for e in entries]
                if isinstance(entries, list)
                else None
            )
        if not isinstance(body, list):
            raise ApiError(422, ["PUT / takes a list of resources (or a Bundle of them)"])
        resources: dict[Key, Resource] = {}
        problems: list[str] = []
        for index, item in enumerate(body):
            where = f"entry {index}"
            if not isinstance(item, dict):
                problems.append(f"{where}: must be a resource (a mapping)")
                continue
            kind = item.get("resourceType")
            if kind not in KINDS:
                problems.append(f"{where}: resourceType must be one of {', '.join(KINDS)}, got {_shown(kind)}")
                continue
            why = id_problem(item.get("id"))
            if why is not None:
                problems.append(f"{where}: id {why}")
                continue
            key = (str(kind), str(item["id"]))
            if key in resources:
                problems.append(f"{where}: {key_text(key)} is in the list twice")
                continue
            try:
                resources[key] = _resource(item, key[0], key[1], where)
            except ApiError as err:
                problems.extend(err.diagnostics)
        if problems:
            raise ApiError(422, problems)
        self._refuse_file_resources(list(resources))
        outcomes: dict[Key, str] = {}

        def plan(current: Snapshot) -> list[Change]:
            for key, resource in resources.items():
                old = current.resources.get(key)
                outcomes[key] = "created" if old is None else "unchanged" if old == resource else "updated"
            return [Change(key, resource) for key, resource in resources.items()]

        result = await self._write(plan, writer, "PUT /")
        lines = [f"{key_text(key)}: {outcome}" for key, outcome in outcomes.items()] or ["nothing to apply"]
        headers: CIMultiDict[str] = CIMultiDict()
        for warning in result.warnings:
            headers.add("Warning", _warning_header(warning))
        return _answer(operation_outcome(lines, severity="information", warnings=result.warnings), 200, headers)

    async def _test_policy(self, request: web.Request, engine: Callable[[], Awaitable[Engine]]) -> web.Response:
        """Check's decision for the described request, and every policy's verdict (policytest.py)."""
        body = await self._body(request)
        current = await engine()
        try:
            test = parse_policy_test(body, current.config)
        except PolicyTestError as err:
            raise ApiError(err.status, err.problems) from None
        return _answer(await run_policy_test(current.authorizer, current.config, test), 200)

    async def _list(self, kind: str) -> web.Response:
        snapshot = await self._load()
        own = self._backend.file.ids(kind)
        items = [*self._backend.file.resources(kind), *(r for r in snapshot.of_type(kind) if r["id"] not in own)]
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(items),
            "entry": [{"resource": without_secrets(kind, r)} for r in items],
        }
        return _answer(bundle, 200)

    async def _read(self, kind: str, ident: str) -> web.Response:
        resource = self._backend.file.resource(kind, ident)
        if resource is None:
            resource = (await self._load()).resources.get((kind, ident))
        if resource is None:
            raise ApiError(404, [f"{kind}/{ident} does not exist"])
        return _answer(without_secrets(kind, resource), 200)

    # -- writing -------------------------------------------------------------------------------

    def _refuse_file_resources(self, keys: Sequence[Key]) -> None:
        file = self._backend.file
        theirs = [k for k in keys if k[1] in file.ids(k[0])]
        if theirs:
            where = file.path or "the config file"
            raise ApiError(
                409,
                [f"{key_text(k)} is defined in the config file {where}: change it there" for k in theirs],
            )

    async def _write(self, plan_changes: Callable[[Snapshot], list[Change]], writer: str, what: str) -> WriteResult:
        """Validate (with the file and the rest of the store), persist, audit, apply; or raise ApiError."""
        store = self._store()
        async with self._writes:
            file = self._backend.file
            backend = self._backend
            written: list[Written] = []
            warnings: list[str] = []
            sent: list[Change] = []  # every resource the request puts, changed or not (it is warned about)

            def plan(current: Snapshot) -> list[Change]:
                changes = plan_changes(current)
                sent[:] = changes
                theirs = [c.key for c in changes if c.key[1] in file.ids(c.key[0])]
                if theirs:  # the file changed since the request was checked
                    raise ApiError(
                        409, [f"{key_text(k)} is defined in the config file: change it there" for k in theirs]
                    )
                try:
                    config = backend.compose(current.changed(changes))
                except ConfigError as err:
                    raise ApiError(422, [str(p) for p in err.problems]) from None
                before = {c.key: current.resources.get(c.key) for c in changes}
                written[:] = [
                    Written(c.key, _action(before[c.key], c.resource), before[c.key], c.resource)
                    for c in changes
                    if before[c.key] != c.resource
                ]
                # check-config's warnings about what was written (a short HMAC secret): never values.
                names = tuple(f"{_WARNING_SUBJECT.get(w.key[0], w.key[0])} '{w.key[1]}'" for w in written)
                warnings[:] = [text for text in config.warnings if text.startswith(names)]
                return changes

            try:
                snapshot = await store.update(plan, floor=backend.write_floor)
            except ConfigError as err:  # reading the store (the plan turns its own into ApiError)
                raise ApiError(503, _unreadable(err)) from err
            for warning in warnings:
                log.warning(warning)
            self._audit(written, writer, what, snapshot)
            # Warned on every PUT of such a policy, even an unchanged one: the answer describes what it allows.
            warnings.extend(
                f"{key_text(c.key)}: {why}"
                for c in sent
                if c.resource is not None and c.key[0] == "AccessPolicy" and (why := allows_everything(c.resource))
            )
            unapplied = await backend.applied()
            if unapplied is not None:
                status, why = unapplied
                raise ApiError(status, [f"the change is persisted in the store, but {why}"])
            return WriteResult(snapshot, written, warnings)

    def _audit(self, written: Sequence[Written], writer: str, what: str, snapshot: Snapshot) -> None:
        """One line and one count per resource changed: who, what, and digests (never a body or a
        secret); one more line and count for each policy it makes allow every request."""
        for change in written:
            kind, ident = change.key
            fields: dict[str, Any] = {
                "writer": writer,
                "request": what,
                "resource": key_text(change.key),
                "type": kind,
                "id": ident,
                "action": change.action,
                "before": digest(kind, change.before),
                "after": digest(kind, change.after),
                "version": snapshot.version,
            }
            if secrets_changed(kind, change.before, change.after):
                fields["secrets_changed"] = True
            log.info("resource written", extra={"fields": fields})
            if self._metrics is not None:
                self._metrics.write(writer, kind, change.action)
            why = allows_everything(change.after) if change.after is not None and kind == "AccessPolicy" else None
            if why is not None:
                log.warning(
                    "a policy written through the API allows every request",
                    extra={"fields": {"writer": writer, "resource": key_text(change.key), "why": why}},
                )
                if self._metrics is not None:
                    self._metrics.allow_everything.labels(writer).inc()

    async def _load(self) -> Snapshot:
        try:
            return await self._store().load()
        except ConfigError as err:
            raise ApiError(503, _unreadable(err)) from err

    def _store(self) -> ResourceStore:
        store = self._backend.store
        if store is None:
            raise ApiError(503, ["no api.store is configured"])
        return store


def _action(before: Resource | None, after: Resource | None) -> str:
    return "create" if before is None else "delete" if after is None else "update"


def _warning_header(text: str) -> str:
    """An RFC 7234 `Warning` value, as Kubernetes sends admission warnings: `299 - "text"` (ASCII)."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in text[:1000])
    return '299 - "' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _prefers_outcome(request: web.Request) -> bool:
    """FHIR's `Prefer: return=OperationOutcome`."""
    return any(
        part.strip().lower() == "return=operationoutcome"
        for value in request.headers.getall("Prefer", [])
        for part in value.split(",")
    )


def _unreadable(err: ConfigError) -> list[str]:
    return [f"the store's content cannot be read, so nothing is written: {p}" for p in err.problems]


def _target(request: web.Request) -> tuple[str | None, str | None]:
    """(type, id) from the raw path, each segment unquoted *after* splitting: `a%2Fb` is the id
    `a/b` (refused), never a path. (None, None) is `/`."""
    raw = request.raw_path
    if not raw.startswith("/"):
        raw = urlsplit(raw).path or "/"
    path = raw.partition("?")[0]
    if path == "/":
        return None, None
    kind, slash, rest = path[1:].partition("/")
    kind = unquote(kind, errors="replace")
    if kind not in KINDS:
        raise ApiError(404, [f"there is no resource type {_shown(kind)} here: {', '.join(KINDS)}"])
    if not slash or rest == "":
        return kind, None
    ident = unquote(rest, errors="replace")
    why = id_problem(ident)
    if why is not None:
        raise ApiError(422, [f"the id in the URL {why}"])
    return kind, ident


def _resource(body: Any, kind: str, ident: str, where: str) -> dict[str, Any]:
    """The resource to store for PUT /kind/ident: the body, checked against the URL, without `meta`."""
    if not isinstance(body, dict):
        raise ApiError(422, [f"{where}: must be a {kind} resource (a mapping)"])
    if body.get("resourceType", kind) != kind:
        raise ApiError(422, [f"{where}: resourceType {_shown(body.get('resourceType'))} contradicts {kind} in the URL"])
    if body.get("id", ident) != ident:
        raise ApiError(422, [f"{where}: id {_shown(body.get('id'))} contradicts {ident!r} in the URL"])
    # meta (versionId, lastUpdated) is the server's in FHIR: what a GET showed can be PUT back.
    return normalized(kind, ident, {k: v for k, v in body.items() if k != "meta"})


def _parse(data: bytes, as_json: bool) -> Any:
    if as_json:
        try:
            return strictjson.loads(data)
        except (ValueError, RecursionError) as err:
            duplicate = _duplicate_json_key(data)
            if duplicate is not None:
                raise ApiError(422, [f"the body has the key {duplicate!r} twice in one object; keep one"]) from None
            where = f" at line {err.lineno}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
            raise ApiError(400, [f"the body is not valid JSON{where}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, ["the body is not UTF-8 text"]) from None
    try:
        return yamlload.load(text)
    except yamlload.YamlError as err:
        raise ApiError(400 if err.syntax else 422, [f"the body {err.message}"]) from None


def _duplicate_json_key(data: bytes) -> str | None:
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for name, _ in items:
            if name in seen and not found:
                found.append(name[:64])
            seen.add(name)
        return dict(items)

    with contextlib.suppress(ValueError, RecursionError):
        json.loads(data, object_pairs_hook=pairs)
    return found[0] if found else None


def _shown(value: Any) -> str:
    """A client's value in a message: short, repr'd."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _answer(body: Any, status: int, headers: Mapping[str, str] | CIMultiDict[str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, ensure_ascii=False),
        content_type="application/json",
        headers=CIMultiDict(headers or {}),
    )
