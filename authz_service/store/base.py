"""What every resource store is: a versioned set of resources, read whole, changed atomically.

A store holds the resources written through the resource API (TokenIntrospector, AccessPolicy,
User, Role), each as the raw mapping it was written as. It is read whole (`load`, a `Snapshot`),
changed by `update` (read, let the caller validate and plan, write: atomically, serialized across
every process using the same store), and polled cheaply (`version`): every process compares
versions to know when to load again. Two backends: `file` (a directory) and `redis`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from authz_service.errors import AuthzError

KINDS: Final[Mapping[str, str]] = MappingProxyType(
    {"TokenIntrospector": "introspectors", "AccessPolicy": "policies", "User": "users", "Role": "roles"}
)
"""Resource type -> the config list that holds resources of that type."""

_ID = re.compile(r"[A-Za-z0-9.\-]{1,64}")
MAX_ID_LENGTH = 64

Key = tuple[str, str]
"""(resourceType, id)"""

Resource = Mapping[str, Any]


def id_problem(value: object) -> str | None:
    """Why `value` is not an id the API accepts (FHIR's: 1-64 of A-Z a-z 0-9 - .), or None when it is."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > MAX_ID_LENGTH:
        return f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}"
    if not _ID.fullmatch(value):
        return "may only contain letters, digits, '-' and '.'"
    if value in (".", ".."):
        return "must not be '.' or '..'"
    return None


def normalized(kind: str, ident: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The resource with its resourceType and id first (how it is stored and shown)."""
    return {"resourceType": kind, "id": ident, **{k: v for k, v in body.items() if k not in ("resourceType", "id")}}


def key_text(key: Key) -> str:
    """`AccessPolicy/admins`: how messages and logs name a resource."""
    return f"{key[0]}/{key[1]}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every resource of a store at one version."""

    version: str  # opaque: equal versions mean equal content; anything else means "load again"
    resources: Mapping[Key, Resource] = field(default_factory=dict)
    generation: int | None = None  # redis: the change counter (a metric); file: None

    def of_type(self, kind: str) -> list[Resource]:
        """The resources of one type, by id (the order they join the config lists in)."""
        return [self.resources[k] for k in sorted(k for k in self.resources if k[0] == kind)]

    def changed(self, changes: Sequence[Change]) -> dict[Key, Resource]:
        """The resources after `changes`."""
        result = dict(self.resources)
        for change in changes:
            if change.resource is None:
                result.pop(change.key, None)
            else:
                result[change.key] = change.resource
        return result


@dataclass(frozen=True, slots=True)
class Change:
    """Put a resource (replacing any with its key) or delete one (resource None)."""

    key: Key
    resource: Resource | None


Plan = Callable[[Snapshot], Sequence[Change]]
"""Given the store as it is, the changes to make (or an exception: nothing is written).
Called in a worker thread, possibly more than once (redis retries when another writer won)."""


class StoreError(AuthzError):
    """The store cannot be read or written. `status` is the HTTP answer (503; 507 when the disk is
    full); the message is safe to show (no secret, no resource content)."""

    def __init__(self, message: str, status: int = 503) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


class ResourceStore(ABC):
    """Where API-written resources live; shared by every process that uses the same location."""

    backend: str
    poll_interval: float  # seconds between `version` polls (a missed announcement costs at most this)
    # Seconds a change found by polling (not announced by a writer of this service) must keep its
    # version before it is applied: files written by hand or by `git checkout` one by one are not
    # applied half-way. 0: every change is atomic (redis).
    settle: float = 0.0

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the store is, for messages (never a password)."""

    _announced: asyncio.Event | None = None

    async def open(self) -> None:
        """Prepare (create the directory, connect); failures show up on first use."""
        self._announced = asyncio.Event()

    def announce(self) -> None:
        """A change is known to have happened (a message, a signal): wake `wait_for_change` now."""
        if self._announced is not None:
            self._announced.set()

    @abstractmethod
    async def load(self) -> Snapshot:
        """Every resource, consistently (StoreError if unreachable, ConfigError if content is unreadable)."""

    @abstractmethod
    async def version(self) -> str:
        """The current version, cheaply (StoreError if unreachable)."""

    @abstractmethod
    async def update(self, plan: Plan, *, floor: int | None = None) -> Snapshot:
        """Run `plan` on the current content and write its changes atomically; the snapshot after.
        `floor` (redis): the change counter after the write is above it, even if the store's counter
        went back (a Redis that restarted empty), so that every process applies the write."""

    async def wait_for_change(self, timeout: float) -> bool:
        """Return when a change is announced (True), or after `timeout` seconds (False)."""
        if self._announced is None:
            self._announced = asyncio.Event()
        announced = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._announced.wait(), timeout)
            announced = True
        self._announced.clear()
        return announced

    async def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""
