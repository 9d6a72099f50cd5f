"""`authz-service apply -f FILE --url URL [--dry-run]`: send a YAML file of resources as one bulk `PUT /`.

The file may be any of the shapes Aidbox users and this service's users already have:
- a YAML list of resources (each with `resourceType` and `id`);
- a stream of YAML documents (`---`), each a resource, a list of resources, or a Bundle;
- a config-style mapping with `introspectors`, `policies`, `users` and `roles` lists (`resourceType`
  is filled in from the list; other sections such as `server` are ignored, with a note).
The service applies all of them or none and answers an OperationOutcome, printed line by line.
`--dry-run` sends the same request with `?_dry_run=true`: the service validates it exactly as it
would apply it (with its config file and its store as they are) and writes nothing.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from authz_service.config import yamlload
from authz_service.store.base import KINDS
from authz_service.store.resources import json_problem

TOKEN_ENV = "AUTHZ_API_TOKEN"
URL_ENV = "AUTHZ_API_URL"
DRY_RUN_NOTE = "dry run: nothing was written"  # the service's first issue in a dry run's answer
_SECTIONS = {section: kind for kind, section in KINDS.items()}
_ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}")


class UsageError(ValueError):
    """The command cannot even be sent (exit 2): a bad file, no token, a bad URL."""


@dataclass(frozen=True)
class Reply:
    """What the service answered."""

    status: int
    body: Any  # parsed JSON, or the text when it was not JSON


def read_resources(text: str, notes: list[str]) -> list[dict[str, Any]]:
    """The resources in a file's text, in order; UsageError naming what is wrong."""
    try:
        documents = yamlload.load_all(text)
    except yamlload.YamlError as err:
        raise UsageError(err.message) from None
    resources: list[dict[str, Any]] = []
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue
        resources.extend(_from_document(document, number, notes))
    for index, resource in enumerate(resources):
        problem = json_problem(resource)
        if problem is not None:
            raise UsageError(f"resource {index + 1}: {problem}")
    if any(_ENV_REF.search(text) for text in _strings(resources)):
        notes.append("values are sent as written: the service does not expand ${VAR} in resources it receives")
    return resources


def _from_document(document: Any, number: int, notes: list[str]) -> list[dict[str, Any]]:
    if isinstance(document, list):
        return [_checked(item, number) for item in document]
    if not isinstance(document, dict):
        raise UsageError(f"document {number} is not a resource, a list of resources, or a config mapping")
    if document.get("resourceType") == "Bundle":
        entries = document.get("entry") or []
        if not isinstance(entries, list):
            raise UsageError(f"document {number}: a Bundle's entry must be a list")
        return [_checked(e.get("resource") if isinstance(e, dict) else e, number) for e in entries]
    if "resourceType" in document:
        return [_checked(document, number)]
    resources: list[dict[str, Any]] = []
    ignored = []
    for section, items in document.items():
        kind = _SECTIONS.get(section)
        if kind is None:
            ignored.append(str(section))
            continue
        if not isinstance(items, list):
            raise UsageError(f"document {number}: {section} must be a list")
        for item in items:
            resource = _checked({"resourceType": kind, **item} if isinstance(item, dict) else item, number)
            if resource["resourceType"] != kind:
                raise UsageError(f"document {number}: {section} may only hold {kind} resources")
            resources.append(resource)
    if ignored:
        notes.append(f"ignoring {', '.join(ignored)} in document {number}: only resources are applied")
    return resources


def _checked(item: Any, number: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise UsageError(f"document {number} holds an entry that is not a resource (a mapping)")
    if item.get("resourceType") not in KINDS:
        raise UsageError(f"document {number}: resourceType must be one of {', '.join(KINDS)}")
    return item


def _strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_url(url: str) -> None:
    """UsageError unless `url` is an http(s) URL."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise UsageError(f"--url must be the admin listener's http:// or https:// URL, got {url!r}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as it is: following one would carry the token somewhere else."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def send(
    url: str,
    token: str,
    body: list[dict[str, Any]] | dict[str, Any],
    timeout: float = 30.0,
    *,
    dry_run: bool = False,
) -> Reply:
    """PUT a list of resources to URL/ (the bulk endpoint), or POST a transaction or batch Bundle
    there; `?_dry_run=true` to write nothing. OSError when the service cannot be reached."""
    check_url(url)
    request = urllib.request.Request(
        url.rstrip("/") + ("/?_dry_run=true" if dry_run else "/"),
        data=json.dumps(body).encode(),
        method="POST" if isinstance(body, dict) else "PUT",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.build_opener(_NoRedirects()).open(request, timeout=timeout) as response:
            return Reply(response.status, _body(response.read()))
    except urllib.error.HTTPError as err:
        return Reply(err.code, _body(err.read()))


def aidbox_bundle(text: str) -> dict[str, Any] | None:
    """The file's Bundle when the file is one of Aidbox's `transaction` or `batch` Bundles (entries
    with a `request`): sent as it is, to POST /, which applies its PUT, POST and DELETE entries.
    None for any other file (read_resources reads it)."""
    try:
        documents = [d for d in yamlload.load_all(text) if d is not None]
    except yamlload.YamlError:
        return None  # read_resources says what is wrong
    if len(documents) != 1 or not isinstance(documents[0], dict):
        return None
    bundle: dict[str, Any] = documents[0]
    entries = bundle.get("entry")
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
        return None
    if not isinstance(entries, list) or not any(isinstance(e, dict) and "request" in e for e in entries):
        return None
    problem = json_problem(bundle)
    if problem is not None:
        raise UsageError(f"the Bundle: {problem}")
    return bundle


def failed_entries(reply: Reply) -> int:
    """How many entries of a batch-response Bundle were not applied."""
    body = reply.body
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return 0
    return sum(not str(_response(e).get("status", "")).startswith("2") for e in body.get("entry") or [])


def _response(entry: Any) -> dict[str, Any]:
    response = entry.get("response") if isinstance(entry, dict) else None
    return response if isinstance(response, dict) else {}


def _body(data: bytes) -> Any:
    text = data.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def print_reply(
    reply: Reply, url: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr, *, dry_run: bool = False
) -> None:
    """The answer, readably: one line per issue of the OperationOutcome, or per entry of a Bundle."""
    ok = 200 <= reply.status < 300
    failed = failed_entries(reply) if ok else 0
    stream = out if ok and not failed else err
    verdict = ("dry run" if dry_run else "applied") if ok else "rejected"
    ending = ", nothing was written" if ok and dry_run else ""
    total = len(reply.body.get("entry") or []) if failed else 0
    ending += f"; {failed} of {total} entries not applied" if failed else ""
    print(f"{verdict}: {url} answered HTTP {reply.status}{ending}", file=stream)
    body = reply.body
    kind = body.get("resourceType") if isinstance(body, dict) else None
    if kind == "OperationOutcome":
        _print_issues(body, "  ", stream)
    elif kind == "Bundle":
        for index, entry in enumerate(body.get("entry") or []):
            response = _response(entry)
            resource = entry.get("resource") if isinstance(entry, dict) else None
            named = f"{resource.get('resourceType')}/{resource.get('id')}" if isinstance(resource, dict) else None
            where = f" {named}" if named else ""
            print(f"  entry {index}{where}: {response.get('status', '')}", file=stream)
            _print_issues(response.get("outcome"), "    ", stream)
    elif body:
        print(f"  {str(body)[:2000]}", file=stream)


def _print_issues(outcome: Any, indent: str, stream: TextIO) -> None:
    issues = outcome.get("issue") if isinstance(outcome, dict) else None
    for issue in issues if isinstance(issues, list) else []:
        if isinstance(issue, dict) and issue.get("diagnostics") != DRY_RUN_NOTE:
            severity = issue.get("severity", "")
            prefix = "" if severity == "information" else f"{severity}: "
            print(f"{indent}{prefix}{issue.get('diagnostics', '')}", file=stream)
