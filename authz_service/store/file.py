"""The file store: one YAML file per resource in a directory (`api.store: {backend: file, path: DIR}`).

Layout: `DIR/<resourceType>.<id>.yaml` (e.g. `AccessPolicy.bob-admin.yaml`), flat, so the same
directory can be committed to git, or mounted from a Kubernetes ConfigMap (whose keys cannot hold
a `/`; a mount is a `..data` symlink to a timestamped directory and one symlink per key, which
this store follows). Files whose names do not fit are ignored (and named in a warning). Names
starting with a dot are the store's own: `.lock` (writers), `.generation` (a change counter
polled by every reader), `.journal.json` (a multi-resource write in flight), `.tmp-*`.

Writes: under an exclusive `flock` on `.lock` (every writing process), each file is written to a
temporary file in the same directory, fsynced, renamed over its target, and the directory fsynced:
a `kill -9` at any moment leaves the old file or the new one, never half of one, and an answered
write is on disk. A write of several resources first commits them all to `.journal.json` (same
steps), then applies them file by file, then removes the journal; readers read the files with the
journal laid over them, so they see all of such a write or none of it, even after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from authz_service import strictjson
from authz_service.config import yamlload
from authz_service.errors import ConfigError, Problem
from authz_service.store.base import (
    KINDS,
    Change,
    Key,
    Plan,
    Resource,
    ResourceStore,
    Snapshot,
    StoreError,
    id_problem,
    normalized,
)
from authz_service.store.resources import json_problem

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(" + "|".join(KINDS) + r")\.(.+)\.yaml$")
GENERATION = ".generation"
JOURNAL = ".journal.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
LOCK_TIMEOUT = 5.0  # seconds a writer waits for another one
FILE_MODE = 0o600  # resources may hold secrets (jwt.secret, introspection credentials)


def file_name(key: Key) -> str:
    """`AccessPolicy.admins.yaml`; ValueError for a key that is not a checked type and id."""
    kind, ident = key
    if kind not in KINDS or id_problem(ident) is not None:
        raise ValueError("not a valid resource key")  # ids never become paths unchecked
    return f"{kind}.{ident}.yaml"


def dump(resource: Resource) -> bytes:
    """A resource as the YAML its file holds."""
    return yaml.safe_dump(dict(resource), sort_keys=False, allow_unicode=True, default_flow_style=False).encode()


class FileStore(ResourceStore):
    """Resources as files in one directory; see the module docstring."""

    backend = "file"
    poll_interval = 0.5
    settle = 1.0  # a directory changed by hand or by git is applied once it stopped changing

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path)
        self._parsed: dict[tuple[str, str], Resource] = {}  # (name, sha256 of the bytes) -> resource

    @property
    def description(self) -> str:
        return f"file store {self.root}"

    async def open(self) -> None:
        await super().open()
        try:
            await asyncio.to_thread(self.root.mkdir, mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            # A read-only mount that lacks the directory: reads see an empty store, writes fail clearly.
            log.warning(
                "cannot create the store directory", extra={"fields": {"store": str(self.root), "error": err.strerror}}
            )

    async def load(self) -> Snapshot:
        return await asyncio.to_thread(self.load_now)

    async def version(self) -> str:
        return await asyncio.to_thread(self._signature)

    async def update(self, plan: Plan, *, floor: int | None = None) -> Snapshot:
        # No floor here: the file store's version is a signature of the directory, not a counter.
        return await asyncio.to_thread(self.update_now, plan)

    # -- reading -----------------------------------------------------------------------------

    def load_now(self) -> Snapshot:
        """Every resource, consistently: the directory is signed before and after reading it."""
        for _ in range(5):
            before = self._signature()
            resources, problems = self._read_all()
            if self._signature() == before:
                break
        else:
            # Still changing: a version no poll will match, so the next poll loads again.
            before = "unsettled-" + secrets.token_hex(8)
        if problems:
            raise ConfigError(problems)
        return Snapshot(before, resources)

    def _signature(self) -> str:
        """What changes whenever any resource file does: names, inodes, times, sizes, the counter."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return "absent"
        except OSError as err:
            raise StoreError(f"cannot read the {self.description}: {err.strerror}") from err
        items = []
        for entry in entries:
            if _NAME.match(entry.name) or entry.name in (JOURNAL, GENERATION):
                try:
                    st = os.stat(entry.path)  # follows a ConfigMap's symlinks to the current data
                except FileNotFoundError:
                    continue
                except OSError as err:
                    raise StoreError(f"cannot read {entry.name} in the {self.description}: {err.strerror}") from err
                items.append((entry.name, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        generation = self._read_text(GENERATION)
        return hashlib.sha256(repr((sorted(items), generation)).encode()).hexdigest()[:24]

    def _read_text(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text(encoding="utf-8", errors="replace")[:200]
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StoreError(f"cannot read {name} in the {self.description}: {err.strerror}") from err

    def _read_all(self) -> tuple[dict[Key, Resource], list[Problem]]:
        resources: dict[Key, Resource] = {}
        problems: list[Problem] = []
        parsed: dict[tuple[str, str], Resource] = {}
        try:
            names = sorted(entry.name for entry in os.scandir(self.root))
        except FileNotFoundError:
            return resources, problems
        except OSError as err:
            raise StoreError(f"cannot read the {self.description}: {err.strerror}") from err
        for name in names:
            match = _NAME.match(name)
            if match is None:
                if name.endswith((".yaml", ".yml", ".json")) and not name.startswith("."):
                    log.warning(
                        "ignoring a file in the store directory: resource files are named <resourceType>.<id>.yaml",
                        extra={"fields": {"store": str(self.root), "file": name}},
                    )
                continue
            kind, ident = match.group(1), match.group(2)
            where = f"store file {name}"
            why = id_problem(ident)
            if why is not None:
                problems.append(Problem(where, "", f"names the id {ident[:80]!r}, which {why}"))
                continue
            try:
                data = (self.root / name).read_bytes()
            except FileNotFoundError:
                continue  # deleted meanwhile: the signature check notices
            except OSError as err:
                raise StoreError(f"cannot read {name} in the {self.description}: {err.strerror}") from err
            digest = hashlib.sha256(data).hexdigest()
            resource = self._parsed.get((name, digest))
            if resource is None:
                try:
                    resource = parse_file(kind, ident, data)
                except ValueError as err:
                    problems.append(Problem(where, "", str(err)))
                    continue
            parsed[(name, digest)] = resource
            resources[(kind, ident)] = resource
        self._parsed = parsed
        journal = self._read_journal(problems)
        for change in journal:
            if change.resource is None:
                resources.pop(change.key, None)
            else:
                resources[change.key] = change.resource
        return resources, problems

    def _read_journal(self, problems: list[Problem]) -> list[Change]:
        try:
            data = (self.root / JOURNAL).read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StoreError(f"cannot read {JOURNAL} in the {self.description}: {err.strerror}") from err
        try:
            return _journal_changes(strictjson.loads(data))
        except (ValueError, RecursionError):
            problems.append(Problem(f"store file {JOURNAL}", "", "is not a journal this service wrote"))
            return []

    # -- writing -----------------------------------------------------------------------------

    def update_now(self, plan: Plan) -> Snapshot:
        """Lock, recover an interrupted write, plan on the current content, write, unlock."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as err:
            raise _write_error(err, self.description) from err
        try:
            self._lock(lock)
            try:
                self._recover()
            except OSError as err:
                raise _write_error(err, self.description) from err
            current = self.load_now()
            changes = [c for c in plan(current) if current.resources.get(c.key) != c.resource]
            if not changes:
                return current
            if len(changes) > 1:
                try:
                    self._write_file(JOURNAL, _journal_bytes(changes), durable=True)  # the commit point
                except OSError as err:
                    raise _write_error(err, self.description) from err
            try:
                self._apply(changes)
            except OSError as err:
                if len(changes) == 1:
                    raise _write_error(err, self.description) from err
                # Committed in the journal: readers see the change; the next write finishes it.
                log.warning(
                    "store files not all written; the journal holds the change",
                    extra={"fields": {"store": str(self.root), "error": err.strerror}},
                )
                return self.load_now()
            if len(changes) > 1:
                with contextlib.suppress(OSError):
                    (self.root / JOURNAL).unlink()
                    self._fsync_dir()
            return self.load_now()
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)

    def _lock(self, fd: int) -> None:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"another writer has held the lock of the {self.description} for {LOCK_TIMEOUT:g} s"
                    ) from None
                time.sleep(0.01)

    def _recover(self) -> None:
        """Finish a multi-resource write a crash interrupted, and drop temporary files of crashed writers."""
        for entry in os.scandir(self.root):
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        problems: list[Problem] = []
        journal = self._read_journal(problems)
        if problems:
            raise StoreError(f"{JOURNAL} in the {self.description} is unreadable; move it away to write again")
        if journal:
            try:
                self._apply(journal)
                (self.root / JOURNAL).unlink()
                self._fsync_dir()
            except OSError as err:
                raise _write_error(err, self.description) from err
            log.info("finished an interrupted store write", extra={"fields": {"store": str(self.root)}})

    def _apply(self, changes: list[Change]) -> None:
        """Write the changes (an OSError here leaves every file whole: the old content or the new)."""
        for change in changes:
            name = file_name(change.key)
            if change.resource is None:
                with contextlib.suppress(FileNotFoundError):
                    (self.root / name).unlink()
            else:
                self._write_file(name, dump(change.resource), durable=False)
        try:
            # Only a hint for readers (who also watch every file's inode and times): best effort.
            counter = self._read_text(GENERATION) or "0"
            number = int(counter) if counter.strip().isdigit() else 0
            self._write_file(GENERATION, f"{number + 1}\n".encode(), durable=False, sync_file=False)
        except (OSError, StoreError) as err:
            log.warning("cannot update the store's change counter", extra={"fields": {"error": str(err)}})
        try:
            self._fsync_dir()
        except OSError as err:
            raise StoreError(
                f"written, but the {self.description} could not be synced to disk ({err.strerror})"
            ) from err

    def _write_file(self, name: str, data: bytes, *, durable: bool, sync_file: bool = True) -> None:
        """Temporary file in the same directory, fsync, rename over `name` (and fsync the directory if durable)."""
        temporary = self.root / f"{TMP_PREFIX}{secrets.token_hex(6)}-{name}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sync_file:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.root / name)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        if durable:
            self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def parse_file(kind: str, ident: str, data: bytes) -> Resource:
    """The resource in a store file named for (kind, ident); ValueError saying what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    try:
        document = yamlload.load(text)
    except yamlload.YamlError as err:
        raise ValueError(err.message) from None
    if not isinstance(document, dict):
        raise ValueError(f"must hold one {kind} resource (a mapping)")
    if document.get("resourceType", kind) != kind:
        raise ValueError(f"resourceType must be {kind} (the file name says so)")
    if document.get("id", ident) != ident:
        raise ValueError(f"id must be {ident!r} (the file name says so)")
    problem = json_problem(document)
    if problem is not None:
        raise ValueError(problem)
    return normalized(kind, ident, document)


def _journal_bytes(changes: list[Change]) -> bytes:
    entries = [{"type": c.key[0], "id": c.key[1], "resource": c.resource} for c in changes]
    return json.dumps({"changes": entries}, ensure_ascii=False).encode()


def _journal_changes(document: Any) -> list[Change]:
    if not isinstance(document, dict) or not isinstance(document.get("changes"), list):
        raise ValueError("not a journal")
    changes = []
    for entry in document["changes"]:
        if not isinstance(entry, Mapping):
            raise ValueError("not a journal entry")
        key = (entry.get("type"), entry.get("id"))
        resource = entry.get("resource")
        if key[0] not in KINDS or id_problem(key[1]) is not None:
            raise ValueError("not a journal entry")
        if resource is not None and not isinstance(resource, dict):
            raise ValueError("not a journal entry")
        changes.append(Change((str(key[0]), str(key[1])), resource))
    return changes


def _write_error(err: OSError, where: str) -> StoreError:
    """A failed write as the API answers it; nothing was changed when this is raised."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"the {where} is full ({err.strerror}); nothing was changed", 507)
    if err.errno == errno.EROFS:
        return StoreError(
            f"the {where} is on a read-only filesystem (a ConfigMap or read-only mount?); "
            "change these resources where they come from; nothing was changed"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return StoreError(f"no permission to write the {where}; nothing was changed")
    return StoreError(f"cannot write the {where} ({err.strerror}); nothing was changed")
