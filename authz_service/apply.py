"""`authz-service apply -f FILE --url URL`: send a YAML file of resources as one bulk `PUT /`.

The file may be any of the shapes Aidbox users and this service's users already have:
- a YAML list of resources (each with `resourceType` and `id`);
- a stream of YAML documents (`---`), each a resource, a list of resources, or a Bundle;
- a config-style mapping with `introspectors`, `policies`, `users` and `roles` lists (`resourceType`
  is filled in from the list; other sections such as `server` are ignored, with a note).
The service applies all of them or none and answers an OperationOutcome, printed line by line.
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


def send(url: str, token: str, resources: list[dict[str, Any]], timeout: float = 30.0) -> Reply:
    """PUT the resources to URL/ (the bulk endpoint); OSError when the service cannot be reached."""
    check_url(url)
    request = urllib.request.Request(
        url.rstrip("/") + "/",
        data=json.dumps(resources).encode(),
        method="PUT",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # a PUT is never redirected
            return Reply(response.status, _body(response.read()))
    except urllib.error.HTTPError as err:
        return Reply(err.code, _body(err.read()))


def _body(data: bytes) -> Any:
    text = data.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def print_reply(reply: Reply, url: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
    """The answer, readably: one line per issue of the OperationOutcome."""
    ok = 200 <= reply.status < 300
    stream = out if ok else err
    print(f"{'applied' if ok else 'rejected'}: {url} answered HTTP {reply.status}", file=stream)
    body = reply.body
    issues = body.get("issue") if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None
    if isinstance(issues, list):
        for issue in issues:
            if isinstance(issue, dict):
                severity = issue.get("severity", "")
                prefix = "" if severity == "information" else f"{severity}: "
                print(f"  {prefix}{issue.get('diagnostics', '')}", file=stream)
    elif body:
        print(f"  {str(body)[:2000]}", file=stream)
