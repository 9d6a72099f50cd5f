"""The resource API, Aidbox's REST workflow on the admin listener (docs/resources.md).

`PUT|GET|DELETE /<Type>/<id>`, `GET|POST /<Type>`, a bulk `PUT /` (a list of resources, all or
none) and `POST /` (Aidbox's `transaction` and `batch` Bundles) for TokenIntrospector,
AccessPolicy, User and Role, and `POST /auth/test-policy` (policytest.py) behind the same token.
Bodies are YAML or JSON, read strictly; every change is validated with the config file and the
rest of the store by the one config validator, persisted by the store (a request's changes in one
store write), and applied (this process, or every worker of a supervisor) before the answer.
`?_dry_run=true` on any write validates the same way and writes nothing. Errors are FHIR
OperationOutcomes, and every refusal names what works instead.
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
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from aiohttp import web
from multidict import CIMultiDict

from authz_service import strictjson
from authz_service.config import yamlload
from authz_service.config.model import ApiToken, Config
from authz_service.engine import Engine
from authz_service.errors import ConfigError, Problem
from authz_service.metrics import ApiMetrics
from authz_service.policytest import PolicyTestError, parse_policy_test, run_policy_test
from authz_service.redact import redact
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
DRY_RUN = "_dry_run"  # ?_dry_run=true on any write: validated as if written, nothing written
# How a dry run's answer says so (FHIR's meta.tag): a Bundle, or the resource a PUT, POST or DELETE answers.
DRY_RUN_TAG: Mapping[str, str] = MappingProxyType(
    {"system": "urn:authz-service", "code": "dry-run", "display": "dry run: nothing was written"}
)
BUNDLE_TYPES = ("transaction", "batch")
BUNDLE_SHAPE = (
    '{"resourceType": "Bundle", "type": "transaction" (all or nothing) or "batch" (each entry on its own), '
    '"entry": [{"request": {"method": "PUT", "url": "/AccessPolicy/<id>"}, "resource": {...}}, '
    '{"request": {"method": "POST", "url": "/User"}, "resource": {...}}, '
    '{"request": {"method": "DELETE", "url": "/Role/<id>"}}]}'
)
ENTRY_SHAPE = (
    '{"request": {"method": "PUT", "url": "/<Type>/<id>"}, "resource": {...}} '
    '(or method POST to "/<Type>" with a resource, or DELETE "/<Type>/<id>")'
)
# What a write did -> the single endpoints' status, and a Bundle entry's response.status.
_STATUS = {"created": 201, "updated": 200, "unchanged": 200, "deleted": 200}
_ENTRY_STATUS = {"created": "201 Created", "updated": "200 OK", "unchanged": "200 OK", "deleted": "204 No Content"}
# `<method> /<Type>` refused: what the same method does one level down.
_ONE = {"PUT": "creates or replaces one", "DELETE": "deletes one"}


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


@dataclass(frozen=True, slots=True)
class Operation:
    """One write a request or a Bundle entry asks for: PUT (create or replace), POST (create only)
    or DELETE, of one resource."""

    method: str
    key: Key
    resource: Resource | None  # None for DELETE

    def apply(self, state: Mapping[Key, Resource]) -> str:
        """What it does to `state`: created, updated, unchanged or deleted; ApiError when it cannot."""
        old = state.get(self.key)
        kind, ident = self.key
        if self.method == "DELETE":
            if old is None:
                raise ApiError(404, [f"{key_text(self.key)} does not exist"])
            return "deleted"
        if old is None:
            return "created"
        if self.method == "POST":
            raise ApiError(
                409,
                [
                    f"{key_text(self.key)} already exists: PUT /{kind}/{ident} replaces it; "
                    "POST without an id creates a new one"
                ],
            )
        return "unchanged" if old == self.resource else "updated"


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
                    raise ApiError(
                        405,
                        [f"{request.method} {TEST_POLICY_PATH} is not supported: POST the request to decide"],
                        {"Allow": "POST"},
                    )
                return await self._test_policy(request, self._engine)
            kind, ident = _target(request)
            method = request.method
            dry_run = _dry_run(request)
            if kind is None:
                if method == "PUT":
                    return await self._bulk(request, writer, dry_run)
                if method == "POST":
                    return await self._bundle(await self._body(request), writer, "POST /", dry_run)
                raise ApiError(
                    405,
                    [
                        f"{method} / is not supported: POST / takes a transaction or batch Bundle, PUT / a list "
                        "of resources; GET /<Type> lists the resources of a type"
                    ],
                    {"Allow": "PUT, POST"},
                )
            if ident is None:
                if method == "GET":
                    return await self._list(kind)
                if method == "POST":
                    return await self._create(request, kind, writer, dry_run)
                one = f"; {method} /{kind}/<id> {_ONE[method]}" if method in _ONE else ""
                raise ApiError(
                    405,
                    [f"{method} /{kind} is not supported: GET /{kind} lists, POST /{kind} creates{one}"],
                    {"Allow": "GET, POST"},
                )
            if method == "GET":
                return await self._read(kind, ident)
            if method == "PUT":
                return await self._put(request, kind, ident, writer, dry_run)
            if method == "DELETE":
                return await self._delete(kind, ident, writer, dry_run)
            raise ApiError(405, [_unsupported(method, kind, ident)], {"Allow": "GET, PUT, DELETE"})
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

    async def _put(self, request: web.Request, kind: str, ident: str, writer: str, dry_run: bool) -> web.Response:
        body = await self._body(request)
        operation = Operation("PUT", (kind, ident), _resource(body, kind, ident, "the body"))
        return await self._one(request, operation, writer, f"PUT /{kind}/{ident}", dry_run)

    async def _create(self, request: web.Request, kind: str, writer: str, dry_run: bool) -> web.Response:
        """POST /<Type>: a new resource, at the body's id or at a new random one (Aidbox keeps a given id)."""
        if "If-None-Exist" in request.headers:
            raise ApiError(
                400,
                [
                    "If-None-Exist (a conditional create) is not supported: give the resource an id and POST it "
                    f"(409 when it exists), or PUT /{kind}/<id>"
                ],
            )
        body = await self._body(request)
        ident = body.get("id") if isinstance(body, dict) else None
        if ident is None:
            ident = str(uuid.uuid4())
        elif (why := id_problem(ident)) is not None:
            raise ApiError(422, [f"the body: id {why}"])
        operation = Operation("POST", (kind, ident), _resource(body, kind, ident, "the body"))
        return await self._one(request, operation, writer, f"POST /{kind}", dry_run)

    async def _one(
        self, request: web.Request, operation: Operation, writer: str, what: str, dry_run: bool
    ) -> web.Response:
        """A single PUT or POST: the resource as stored, `Location` when created, warnings as headers."""
        kind = operation.key[0]
        outcomes, result = await self._transaction([operation], writer, what, dry_run)
        status = _STATUS[outcomes[0]]
        headers: CIMultiDict[str] = CIMultiDict({"Location": _location(operation.key)} if status == 201 else {})
        for warning in result.warnings:
            headers.add("Warning", _warning_header(warning))
        if _prefers_outcome(request) and (result.warnings or dry_run):
            # FHIR's Prefer: return=OperationOutcome: the outcome (with the warnings) instead of the resource.
            lines = [*_dry_run_note(dry_run), f"{key_text(operation.key)}: {outcomes[0]}"]
            return _answer(operation_outcome(lines, severity="information", warnings=result.warnings), status, headers)
        assert operation.resource is not None
        return _answer(_shown_resource(kind, operation.resource, dry_run), status, headers)

    async def _delete(self, kind: str, ident: str, writer: str, dry_run: bool) -> web.Response:
        operation = Operation("DELETE", (kind, ident), None)
        _, result = await self._transaction([operation], writer, f"DELETE /{kind}/{ident}", dry_run)
        deleted = result.written[0].before  # a delete of what exists always changes the store
        assert deleted is not None
        return _answer(_shown_resource(kind, deleted, dry_run), 200)

    async def _bulk(self, request: web.Request, writer: str, dry_run: bool) -> web.Response:
        body = await self._body(request)
        if isinstance(body, dict) and body.get("resourceType") == "Bundle":
            entries = body.get("entry") or []
            requests = isinstance(entries, list) and any(isinstance(e, dict) and "request" in e for e in entries)
            if requests and body.get("type") in BUNDLE_TYPES:
                return await self._bundle(body, writer, "PUT /", dry_run)  # Aidbox's shape, sent to PUT
            body = (
                [e.get("resource") if isinstance(e, dict) else e for e in entries]
                if isinstance(entries, list)
                else None
            )
        if not isinstance(body, list):
            raise ApiError(
                422,
                [
                    "PUT / takes a list of resources (or a Bundle of them); POST / takes a transaction or batch "
                    "Bundle; PUT /<Type>/<id> writes one resource"
                ],
            )
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
        operations = [Operation("PUT", key, resource) for key, resource in resources.items()]
        outcomes, result = await self._transaction(operations, writer, "PUT /", dry_run)
        lines = [f"{key_text(o.key)}: {outcome}" for o, outcome in zip(operations, outcomes, strict=True)]
        headers: CIMultiDict[str] = CIMultiDict()
        for warning in result.warnings:
            headers.add("Warning", _warning_header(warning))
        lines = [*_dry_run_note(dry_run), *(lines or ["nothing to apply"])]
        return _answer(operation_outcome(lines, severity="information", warnings=result.warnings), 200, headers)

    async def _bundle(self, body: Any, writer: str, path: str, dry_run: bool) -> web.Response:
        """A `transaction` (all entries or none) or `batch` (each entry on its own) Bundle, as Aidbox
        takes them: each entry a `request: {method, url}` (PUT, POST or DELETE) and its `resource`."""
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise ApiError(
                422,
                [
                    f"{path} takes a Bundle: {BUNDLE_SHAPE}; to apply a plain list of resources, PUT / it",
                ],
            )
        kind = body.get("type")
        if kind not in BUNDLE_TYPES:
            raise ApiError(422, [f"a Bundle of type {_shown(kind)} cannot be applied: use type transaction or batch"])
        entries = body.get("entry", [])
        if not isinstance(entries, list):
            raise ApiError(422, [f"the Bundle's entry must be a list: {BUNDLE_SHAPE}"])
        parsed: list[Operation | ApiError] = []
        for index, entry in enumerate(entries):
            try:
                parsed.append(entry_operation(index, entry))
            except ApiError as err:
                parsed.append(err)
        what = f"{path} ({kind})"
        if kind == "transaction":
            return await self._all_or_nothing(parsed, writer, what, dry_run)
        return await self._each(parsed, writer, what, dry_run)

    async def _all_or_nothing(
        self, parsed: Sequence[Operation | ApiError], writer: str, what: str, dry_run: bool
    ) -> web.Response:
        failed = [p for p in parsed if isinstance(p, ApiError)]
        first: dict[Key, int] = {}
        for index, item in enumerate(parsed):
            if isinstance(item, Operation):
                if item.key in first:
                    failed.append(
                        ApiError(
                            422,
                            [
                                f"entry {index}: {key_text(item.key)} is also in entry {first[item.key]}: a "
                                "transaction changes each resource once"
                            ],
                        )
                    )
                first.setdefault(item.key, index)
        if failed:
            raise ApiError(failed[0].status, [d for f in failed for d in f.diagnostics])
        operations = [p for p in parsed if isinstance(p, Operation)]
        outcomes, result = await self._transaction(operations, writer, what, dry_run, entries=True)
        notes = _entry_notes(operations, result.warnings)
        entries = [
            _response_entry(o, outcome, notes.get(i, []), dry_run)
            for i, (o, outcome) in enumerate(zip(operations, outcomes, strict=True))
        ]
        return self._bundle_answer("transaction-response", entries, result.warnings, dry_run)

    async def _each(
        self, parsed: Sequence[Operation | ApiError], writer: str, what: str, dry_run: bool
    ) -> web.Response:
        """A batch: every entry that can apply is applied, in one store write. The entries are
        validated together (one validation, not one per entry: each costs as much as the whole
        config); an entry the validator's problems name is refused and the rest validated again."""
        failed = [p for p in parsed if isinstance(p, ApiError)]
        if len(failed) == len(parsed):  # nothing to validate or write: the store is not even locked
            return self._bundle_answer("batch-response", [_failed_entry(p) for p in failed], [], dry_run)
        file = self._backend.file
        compose = _LastValidated(self._backend.compose)
        results: dict[int, str | ApiError] = {}

        def plan(current: Snapshot) -> list[Change]:
            refused: dict[int, ApiError] = {i: p for i, p in enumerate(parsed) if isinstance(p, ApiError)}
            while True:
                state, outcomes, unapplicable = _batch_state(current, parsed, refused, file)
                try:
                    compose(state)
                    break
                except ConfigError as err:
                    blamed = _blamed(err.problems, parsed, outcomes)
                    if not blamed:  # a problem no entry wrote (a delete broke a stored resource): one at a time
                        state, outcomes, unapplicable = _batch_state(current, parsed, refused, file, compose=compose)
                        break
                    refused.update({i: ApiError(422, texts) for i, texts in blamed.items()})
            results.clear()
            results.update({**outcomes, **unapplicable, **refused})
            touched: dict[Key, None] = {}  # an unchanged PUT too: it is warned about as any PUT is
            for index in sorted(outcomes):
                item = parsed[index]
                assert isinstance(item, Operation)
                touched[item.key] = None
            return [Change(key, state.get(key)) for key in touched]

        result = await self._write(plan, writer, what, dry_run=dry_run, compose=compose)
        operations = {i: p for i, p in enumerate(parsed) if isinstance(p, Operation)}
        notes = _entry_notes(list(operations.values()), result.warnings)
        positions = {i: n for n, i in enumerate(operations)}
        entries = []
        for index, item in enumerate(parsed):
            outcome = results[index]
            if isinstance(outcome, ApiError):
                entries.append(_failed_entry(outcome))
            else:
                assert isinstance(item, Operation)
                entries.append(_response_entry(item, outcome, notes.get(positions[index], []), dry_run))
        return self._bundle_answer("batch-response", entries, result.warnings, dry_run)

    def _bundle_answer(
        self, kind: str, entries: list[dict[str, Any]], warnings: Sequence[str], dry_run: bool
    ) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict()
        for warning in warnings:
            headers.add("Warning", _warning_header(warning))
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": kind, "entry": entries}
        if dry_run:
            bundle["meta"] = {"tag": [dict(DRY_RUN_TAG)]}
        return _answer(bundle, 200, headers)

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

    def _refuse_file_resources(self, keys: Sequence[Key], labels: Sequence[str] | None = None) -> None:
        file = self._backend.file
        theirs = [i for i, k in enumerate(keys) if k[1] in file.ids(k[0])]
        if theirs:
            err = _file_conflict([keys[i] for i in theirs], file)
            if labels is not None:
                err.diagnostics = [f"{labels[i]}: {text}" for i, text in zip(theirs, err.diagnostics, strict=True)]
            raise err

    async def _transaction(
        self, operations: Sequence[Operation], writer: str, what: str, dry_run: bool, *, entries: bool = False
    ) -> tuple[list[str], WriteResult]:
        """Every operation or none, as one store write (validated as one): what each does, in order.
        `entries`: the operations are a Bundle's entries, and every problem names its entry."""
        labels = [f"entry {i}" for i in range(len(operations))] if entries else None
        self._refuse_file_resources([o.key for o in operations], labels)
        outcomes: list[str] = []

        def plan(current: Snapshot) -> list[Change]:
            state = dict(current.resources)
            done: list[str] = []
            failed: list[ApiError] = []
            for index, operation in enumerate(operations):
                try:
                    done.append(operation.apply(state))
                except ApiError as err:
                    prefix = f"entry {index}: " if entries else ""
                    failed.append(ApiError(err.status, [prefix + d for d in err.diagnostics]))
                    continue
                if operation.resource is None:
                    state.pop(operation.key, None)
                else:
                    state[operation.key] = operation.resource
            if failed:
                raise ApiError(failed[0].status, [d for f in failed for d in f.diagnostics])
            outcomes[:] = done
            return [Change(o.key, o.resource) for o in operations]

        problem_text: Callable[[Problem], str] = str
        if entries:
            # check-config names a resource `policy 'p1'`: the entry that wrote it is what the client can find.
            subjects = {_subject(o.key): i for i, o in enumerate(operations)}

            def problem_text(problem: Problem) -> str:
                index = subjects.get(problem.where)
                return str(problem) if index is None else f"entry {index}: {problem}"

        result = await self._write(plan, writer, what, dry_run=dry_run, problem_text=problem_text)
        return outcomes, result

    async def _write(
        self,
        plan_changes: Callable[[Snapshot], list[Change]],
        writer: str,
        what: str,
        *,
        dry_run: bool = False,
        problem_text: Callable[[Problem], str] = str,
        compose: Callable[[Mapping[Key, Resource]], Config] | None = None,
    ) -> WriteResult:
        """Validate (with the file and the rest of the store), persist, audit, apply; or raise ApiError.
        A dry run validates the same way against the store as it is, and writes, audits and counts nothing."""
        store = self._store()
        file = self._backend.file
        backend = self._backend
        validate = compose or backend.compose
        written: list[Written] = []
        warnings: list[str] = []
        sent: list[Change] = []  # every resource the request puts, changed or not (it is warned about)

        def plan(current: Snapshot) -> list[Change]:
            changes = plan_changes(current)
            sent[:] = changes
            theirs = [c.key for c in changes if c.key[1] in file.ids(c.key[0])]
            if theirs:  # the file changed since the request was checked
                raise ApiError(409, [f"{key_text(k)} is defined in the config file: change it there" for k in theirs])
            try:
                config = validate(current.changed(changes))
            except ConfigError as err:
                raise ApiError(422, [problem_text(p) for p in err.problems]) from None
            before = {c.key: current.resources.get(c.key) for c in changes}
            written[:] = [
                Written(c.key, _action(before[c.key], c.resource), before[c.key], c.resource)
                for c in changes
                if before[c.key] != c.resource
            ]
            # check-config's warnings about what was written (a short HMAC secret): never values.
            names = tuple(f"{_subject(w.key)}:" for w in written)
            warnings[:] = [text for text in config.warnings if text.startswith(names)]
            return changes

        if dry_run:
            current = await self._load()
            await asyncio.to_thread(plan, current)  # validation compiles policies: off the loop
            log.info(
                "resource write dry run",
                extra={
                    "fields": {
                        "writer": writer,
                        "request": what,
                        "dry_run": True,
                        "would": [f"{key_text(w.key)}: {w.action}" for w in written],
                    }
                },
            )
            snapshot = current
        else:
            async with self._writes:
                try:
                    snapshot = await store.update(plan, floor=backend.write_floor)
                except ConfigError as err:  # reading the store (the plan turns its own into ApiError)
                    raise ApiError(503, _unreadable(err)) from err
                for warning in warnings:
                    log.warning(warning)
                self._audit(written, writer, what, snapshot)
                unapplied = await backend.applied()
                if unapplied is not None:
                    status, reason = unapplied
                    raise ApiError(status, [f"the change is persisted in the store, but {reason}"])
        # Warned on every PUT of such a policy, even an unchanged one: the answer describes what it allows.
        warnings.extend(
            f"{key_text(c.key)}: {why}"
            for c in sent
            if c.resource is not None and c.key[0] == "AccessPolicy" and (why := allows_everything(c.resource))
        )
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


def _subject(key: Key) -> str:
    """How check-config names a resource: `policy 'p1'`."""
    return f"{_WARNING_SUBJECT.get(key[0], key[0])} {key[1]!r}"


def _location(key: Key) -> str:
    return f"/{key[0]}/{key[1]}"


def _dry_run(request: web.Request) -> bool:
    """`?_dry_run=true`; ApiError 400 for anything but one `true` or `false`."""
    values = request.query.getall(DRY_RUN, [])
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise ApiError(400, [f"{DRY_RUN} must be given once, as true or false"])
    return values[0] == "true"


def _dry_run_note(dry_run: bool) -> list[str]:
    return [str(DRY_RUN_TAG["display"])] if dry_run else []


def _shown_resource(kind: str, resource: Resource, dry_run: bool) -> dict[str, Any]:
    """A resource as an answer shows it: without secrets; tagged when it was not written."""
    shown = without_secrets(kind, resource)
    if dry_run:
        shown["meta"] = {"tag": [dict(DRY_RUN_TAG)]}
    return shown


def _unsupported(method: str, kind: str, ident: str) -> str:
    """The refusal of `method /<kind>/<ident>`, naming what works instead."""
    if method == "POST":
        return (
            f"POST /{kind}/{ident} is not supported: PUT /{kind}/{ident} creates or replaces it; "
            f"POST /{kind} creates one with a new id"
        )
    if method == "PATCH":
        return f"PATCH is not supported: PUT the whole resource to /{kind}/{ident}"
    return f"{method} /{kind}/{ident} is not supported: GET, PUT or DELETE it"


def entry_operation(index: int, entry: Any) -> Operation:
    """The write a Bundle entry asks for (Aidbox's `request: {method, url}` and `resource`), or
    ApiError naming the entry, what is wrong, and the shape that works."""
    where = f"entry {index}"
    if not isinstance(entry, dict):
        raise ApiError(422, [f"{where}: must be a mapping: {ENTRY_SHAPE}"])
    request = entry.get("request")
    if request is None:
        raise ApiError(422, [f"{where}: request is missing (what to do with the entry): {ENTRY_SHAPE}"])
    if not isinstance(request, dict):
        raise ApiError(422, [f"{where}: request must be a mapping with method and url: {ENTRY_SHAPE}"])
    method, url = request.get("method"), request.get("url")
    if method == "PATCH":
        raise ApiError(422, [f"{where}: PATCH is not supported: PUT the whole resource"])
    if method == "GET":
        raise ApiError(422, [f"{where}: GET is not supported in a Bundle: GET /<Type>/<id> or GET /<Type> reads"])
    if method not in ("PUT", "POST", "DELETE"):
        raise ApiError(422, [f"{where}: request.method must be PUT, POST or DELETE, got {_shown(method)}"])
    if not isinstance(url, str) or not url.strip("/"):
        raise ApiError(422, [f"{where}: request.url must be /<Type>/<id> (POST: /<Type>), got {_shown(url)}"])
    if "?" in url or "#" in url:
        raise ApiError(
            422,
            [
                f"{where}: request.url {_shown(url)} has a query: conditional writes are not supported; "
                "name the resource, /<Type>/<id>"
            ],
        )
    kind, _, ident = url.removeprefix("/").partition("/")
    if kind not in KINDS:
        raise ApiError(
            422, [f"{where}: request.url: there is no resource type {_shown(kind)} here: {', '.join(KINDS)}"]
        )
    resource = entry.get("resource")
    if method == "DELETE":
        if not ident:
            raise ApiError(422, [f"{where}: DELETE needs request.url /{kind}/<id>"])
    elif resource is None:
        raise ApiError(422, [f"{where}: resource is missing: {method} carries the resource to write"])
    if method == "PUT" and not ident:
        raise ApiError(422, [f"{where}: PUT needs request.url /{kind}/<id>; POST to /{kind} creates one with a new id"])
    if method == "POST":
        if ident:
            raise ApiError(
                422,
                [
                    f"{where}: POST goes to /{kind} (the id is the resource's own, or a new one); "
                    f"PUT /{kind}/{ident} writes at that id"
                ],
            )
        given = resource.get("id") if isinstance(resource, dict) else None
        ident = str(uuid.uuid4()) if given is None else given
    why = id_problem(ident)
    if why is not None:
        raise ApiError(422, [f"{where}: the id {why}"])
    if method == "DELETE":
        return Operation("DELETE", (kind, ident), None)
    return Operation(method, (kind, ident), _resource(resource, kind, ident, f"{where}: resource"))


def _entry_notes(operations: Sequence[Operation], warnings: Sequence[str]) -> dict[int, list[str]]:
    """The warnings about each operation (by position), as a Bundle entry's response.outcome shows them."""
    owners = {f"{key_text(o.key)}:": i for i, o in enumerate(operations)}
    owners.update({f"{_subject(o.key)}:": i for i, o in enumerate(operations)})
    notes: dict[int, list[str]] = {}
    for text in warnings:
        for prefix, index in owners.items():
            if text.startswith(prefix):
                notes.setdefault(index, []).append(text)
                break
    return notes


def _response_entry(operation: Operation, outcome: str, notes: Sequence[str], dry_run: bool) -> dict[str, Any]:
    """A Bundle response entry: FHIR's response.status (and location), the resource as written."""
    response: dict[str, Any] = {"status": _ENTRY_STATUS[outcome]}
    if outcome == "created":
        response["location"] = _location(operation.key)
    if notes:
        response["outcome"] = operation_outcome([], warnings=notes)
    entry: dict[str, Any] = {}
    if operation.resource is not None:
        entry["resource"] = _shown_resource(operation.key[0], operation.resource, dry_run)
    entry["response"] = response
    return entry


def _failed_entry(err: ApiError) -> dict[str, Any]:
    """A batch entry that was not applied: its status and why, as an OperationOutcome."""
    status = f"{err.status} {HTTPStatus(err.status).phrase}"
    return {"response": {"status": status, "outcome": operation_outcome(err.diagnostics, err.status)}}


def _file_conflict(keys: Sequence[Key], file: ConfigFile) -> ApiError:
    where = file.path or "the config file"
    return ApiError(409, [f"{key_text(k)} is defined in the config file {where}: change it there" for k in keys])


class _LastValidated:
    """The backend's compose, remembering the last config it built: a batch's plan validates the
    resources it will write, and the write's own check of the same resources then costs nothing."""

    def __init__(self, compose: Callable[[Mapping[Key, Resource]], Config]) -> None:
        self._compose = compose
        self._last: tuple[dict[Key, Resource], Config] | None = None

    def __call__(self, resources: Mapping[Key, Resource]) -> Config:
        if self._last is not None and self._last[0] == resources:
            return self._last[1]
        config = self._compose(resources)
        self._last = (dict(resources), config)
        return config


def _written(state: dict[Key, Resource], operation: Operation) -> None:
    if operation.resource is None:
        state.pop(operation.key, None)
    else:
        state[operation.key] = operation.resource


def _batch_state(
    current: Snapshot,
    parsed: Sequence[Operation | ApiError],
    refused: Mapping[int, ApiError],
    file: ConfigFile,
    compose: Callable[[Mapping[Key, Resource]], Config] | None = None,
) -> tuple[dict[Key, Resource], dict[int, str], dict[int, ApiError]]:
    """The store after every entry not refused, in order: the resources, what each entry did, and
    the entries that cannot apply to the store as the entries before them left it (404, 409).

    With `compose`, every entry that changes something is validated on the store it leaves (one
    validation each), and refused with 422 when that fails: for a problem that names no entry's
    resource, such as a delete that leaves a stored policy naming what it deleted."""
    state = dict(current.resources)
    outcomes: dict[int, str] = {}
    unapplicable: dict[int, ApiError] = {}
    for index, item in enumerate(parsed):
        if index in refused or isinstance(item, ApiError):
            continue
        try:
            if item.key[1] in file.ids(item.key[0]):
                raise _file_conflict([item.key], file)
            outcome = item.apply(state)
            if compose is not None and outcome != "unchanged":
                after = dict(state)
                _written(after, item)
                try:
                    compose(after)
                except ConfigError as err:
                    raise ApiError(422, [str(p) for p in err.problems]) from None
        except ApiError as err:
            unapplicable[index] = err
            continue
        _written(state, item)
        outcomes[index] = outcome
    return state, outcomes, unapplicable


def _blamed(
    problems: Sequence[Problem], parsed: Sequence[Operation | ApiError], outcomes: Mapping[int, str]
) -> dict[int, list[str]]:
    """The validator's problems by the entry that wrote the resource each names (the last entry
    that put it); problems about a resource no entry put are nobody's here."""
    writers: dict[str, int] = {}
    for index in sorted(outcomes):
        item = parsed[index]
        assert isinstance(item, Operation)
        if item.resource is None:
            writers.pop(_subject(item.key), None)
        else:
            writers[_subject(item.key)] = index
    blamed: dict[int, list[str]] = {}
    for problem in problems:
        writer = writers.get(problem.where)
        if writer is not None:
            blamed.setdefault(writer, []).append(str(problem))
    return blamed


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
