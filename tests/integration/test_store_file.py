"""The file store on real filesystems: layout, atomic writes, kill -9, a full disk, read-only and
ConfigMap mounts, journals, and ids that must never become paths."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_service.errors import ConfigError
from authz_service.store.base import Change, Snapshot, StoreError
from authz_service.store.file import JOURNAL, FileStore, _journal_bytes, file_name


def policy(ident: str, description: str = "x") -> dict[str, Any]:
    return {"resourceType": "AccessPolicy", "id": ident, "engine": "allow", "description": description}


def yaml_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.yaml"))


def put(*resources: dict[str, Any]) -> Any:
    """A plan that puts these resources."""
    return lambda _: [Change((r["resourceType"], r["id"]), r) for r in resources]


async def test_one_yaml_file_per_resource_created_with_its_directory(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "a" / "store")
    await store.open()
    assert (tmp_path / "a" / "store").is_dir()
    before = await store.version()
    after = await store.update(put(policy("p1"), {"resourceType": "User", "id": "u.1", "name": "Ann"}))
    assert set(after.resources) == {("AccessPolicy", "p1"), ("User", "u.1")}
    assert after.version == await store.version() != before
    files = sorted(p.name for p in (tmp_path / "a" / "store").iterdir() if not p.name.startswith("."))
    assert files == ["AccessPolicy.p1.yaml", "User.u.1.yaml"]
    text = (tmp_path / "a" / "store" / "User.u.1.yaml").read_text()
    assert text == "resourceType: User\nid: u.1\nname: Ann\n"
    assert (tmp_path / "a" / "store" / "User.u.1.yaml").stat().st_mode & 0o777 == 0o600  # may hold secrets
    assert (await store.load()).resources == after.resources
    assert not [p for p in (tmp_path / "a" / "store").iterdir() if p.name.startswith((".tmp-", JOURNAL))]


async def test_delete_and_unchanged_writes(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    first = await store.update(put(policy("p1")))
    same = await store.update(put(policy("p1")))
    assert same.version == first.version  # nothing to write: nothing written
    gone = await store.update(lambda _: [Change(("AccessPolicy", "p1"), None)])
    assert gone.resources == {}
    assert not (tmp_path / "AccessPolicy.p1.yaml").exists()


async def test_a_plan_that_raises_writes_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.update(put(policy("p1")))

    def refuse(_: Snapshot) -> list[Change]:
        raise ValueError("invalid")

    with pytest.raises(ValueError, match="invalid"):
        await store.update(refuse)
    assert set((await store.load()).resources) == {("AccessPolicy", "p1")}


@pytest.mark.parametrize("ident", ["..", ".", "a/b", "../../etc/passwd", "a\x00b", "x" * 65, "", "é"])
def test_ids_never_become_paths(ident: str) -> None:
    with pytest.raises(ValueError, match="not a valid resource key"):
        file_name(("AccessPolicy", ident))
    with pytest.raises(ValueError, match="not a valid resource key"):
        file_name(("Patient", "p1"))


async def test_other_files_are_ignored_and_broken_ones_named(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# resources\n")
    (tmp_path / ".gitignore").write_text(".lock\n")
    (tmp_path / "notes.yaml").write_text("a: 1\n")  # not <Type>.<id>.yaml: ignored, with a warning
    (tmp_path / "AccessPolicy.ok.yaml").write_text("engine: allow\n")  # id and type from the name
    store = FileStore(tmp_path)
    assert (await store.load()).resources == {
        ("AccessPolicy", "ok"): {"resourceType": "AccessPolicy", "id": "ok", "engine": "allow"}
    }
    (tmp_path / "AccessPolicy.bad.yaml").write_text("engine: allow\nengine: matcho\n")
    (tmp_path / "User.other.yaml").write_text("id: someone-else\n")
    (tmp_path / "Role.r.yaml").write_text("- a list\n")
    (tmp_path / "User.date.yaml").write_text("born: 2001-02-03\n")
    (tmp_path / "AccessPolicy....yaml").write_text("engine: allow\n")
    with pytest.raises(ConfigError) as caught:
        await store.load()
    assert sorted(str(p) for p in caught.value.problems) == [
        "store file AccessPolicy....yaml: names the id '..', which must not be '.' or '..'",
        "store file AccessPolicy.bad.yaml: has the key 'engine' twice in one mapping (line 1 and line 2); keep one",
        "store file Role.r.yaml: must hold one Role resource (a mapping)",
        "store file User.date.yaml: born is a YAML date, not JSON data (quote it to make it a string)",
        "store file User.other.yaml: id must be 'other' (the file name says so)",
    ]


async def test_many_writers_lose_nothing(tmp_path: Path) -> None:
    """Threads with their own store objects (as processes would be): the lock serializes them."""
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        store = FileStore(tmp_path)
        for i in range(10):
            try:
                store.update_now(put(policy(f"w{n}-{i}")))
            except BaseException as err:
                errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join, 30)
    assert errors == []
    assert len((await FileStore(tmp_path).load()).resources) == 40
    assert (tmp_path / ".generation").read_text() == "40\n"


async def test_a_committed_journal_is_seen_by_readers_and_finished_by_the_next_writer(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.update(put(policy("old")))
    # As if a writer died right after committing a two-resource write, before touching any file.
    changes = [Change(("AccessPolicy", "new"), policy("new")), Change(("AccessPolicy", "old"), None)]
    (tmp_path / JOURNAL).write_bytes(_journal_bytes(changes))
    assert set((await store.load()).resources) == {("AccessPolicy", "new")}
    await store.update(put(policy("third")))
    assert not (tmp_path / JOURNAL).exists()
    assert yaml_files(tmp_path) == ["AccessPolicy.new.yaml", "AccessPolicy.third.yaml"]


WRITER = """
import sys
from authz_service.store.base import Change
from authz_service.store.file import FileStore

store = FileStore(sys.argv[1])
i = 0
while True:
    i += 1
    if i % 3:
        key = ("AccessPolicy", f"p{i % 7}")
        changes = [Change(key, {"resourceType": key[0], "id": key[1], "engine": "allow",
                                "description": f"{i} " + "x" * (i * 37 % 3000)})]
    else:  # a two-resource write goes through the journal
        changes = [Change(("User", f"u{i % 5}"), {"resourceType": "User", "id": f"u{i % 5}", "n": i}),
                   Change(("Role", f"r{i % 5}"), {"resourceType": "Role", "id": f"r{i % 5}", "name": "x",
                                                 "user": {"id": f"u{i % 5}"}, "n": i})]
    store.update_now(lambda _: changes)
    print(i, flush=True)  # acknowledged
"""


def _written_by(i: int) -> dict[tuple[str, str], int]:
    """Which resources write i sets, to which number."""
    if i % 3:
        return {("AccessPolicy", f"p{i % 7}"): i}
    return {("User", f"u{i % 5}"): i, ("Role", f"r{i % 5}"): i}


def _number(resource: Any) -> int:
    return int(resource["description"].split()[0]) if "description" in resource else int(resource["n"])


@pytest.mark.slow  # five writer processes killed at random moments
async def test_kill_9_at_any_moment_leaves_whole_files_and_loses_no_acknowledged_write(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    for _ in range(5):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, str(directory), stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        # The first acknowledgement (start-up may be slow on a busy machine), then a random moment.
        acknowledged = [int(await asyncio.wait_for(process.stdout.readline(), 30))]
        deadline = asyncio.get_running_loop().time() + random.uniform(0.1, 0.8)
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(TimeoutError):
                line = await asyncio.wait_for(process.stdout.readline(), 0.05)
                if line:
                    acknowledged.append(int(line))
        process.kill()  # SIGKILL: no cleanup of any kind
        rest = await process.stdout.read()
        acknowledged += [int(n) for n in rest.split()]
        await process.wait()

        snapshot = await FileStore(directory).load()  # every file parses (or this raises)
        expected: dict[tuple[str, str], int] = {}
        for i in acknowledged:
            expected.update(_written_by(i))
        for key, number in expected.items():
            stored = _number(snapshot.resources[key])
            # The last acknowledged write, or one after it that finished before the kill.
            assert stored >= number, (key, stored, number)
            assert key in _written_by(stored)
        # A journal-backed write is whole: a user and its role always carry the same write number.
        for n in range(5):
            user, role = snapshot.resources.get(("User", f"u{n}")), snapshot.resources.get(("Role", f"r{n}"))
            assert (user is None) == (role is None)
            if user is not None:
                assert _number(user) == _number(role)
        # And the next writer carries on (finishing any interrupted journal).
        await FileStore(directory).update(put(policy("after-crash")))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs mounted for the test (needs root, as in the dev container and CI)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> None:
    """Fill the filesystem of `directory` to the last byte (ENOSPC from the kernel, not a mock)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


async def test_a_full_disk_is_a_clear_507_and_the_old_resources_stay_intact(small_disk: Path) -> None:
    store = FileStore(small_disk / "store")
    await store.open()
    before = await store.update(put(policy("p1", "old"), policy("p2", "old")))
    await asyncio.to_thread(fill, small_disk)
    big = policy("p1", "new " + "y" * 20_000)
    with pytest.raises(StoreError) as caught:
        await store.update(put(big))
    assert caught.value.status == 507
    assert "is full" in caught.value.message
    assert "nothing was changed" in caught.value.message
    with pytest.raises(StoreError) as caught:
        await store.update(put(big, policy("p3")))  # through the journal
    assert caught.value.status == 507
    after = await store.load()
    assert after.resources == before.resources
    assert not [p for p in (small_disk / "store").iterdir() if p.name.startswith(".tmp-")]
    (small_disk / "filler").unlink()
    assert (await store.update(put(big))).resources[("AccessPolicy", "p1")] == big


async def test_a_read_only_mount_is_read_and_writes_are_a_clear_503(small_disk: Path) -> None:
    store = FileStore(small_disk / "store")
    await store.update(put(policy("p1")))
    await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert set((await store.load()).resources) == {("AccessPolicy", "p1")}
    with pytest.raises(StoreError) as caught:
        await store.update(put(policy("p2")))
    assert caught.value.status == 503
    assert "read-only" in caught.value.message


def configmap(directory: Path, files: dict[str, str], generation: int) -> None:
    """What the kubelet does on a ConfigMap update: a new timestamped directory, `..data` swapped to
    it atomically (rename of a symlink), one symlink per key through `..data`."""
    directory.mkdir(exist_ok=True)
    data = directory / f"..2026_11_29_00_00_0{generation}.000000001"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    temporary = directory / "..data_tmp"
    temporary.symlink_to(data.name)
    os.replace(temporary, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


async def test_a_configmap_mount_is_read_through_its_symlinks_and_its_updates_seen(tmp_path: Path) -> None:
    directory = tmp_path / "resources"
    configmap(directory, {"AccessPolicy.a.yaml": "engine: allow\n", "User.u.yaml": "name: Ann\n"}, 1)
    store = FileStore(directory)
    first = await store.load()
    assert first.resources[("User", "u")] == {"resourceType": "User", "id": "u", "name": "Ann"}
    configmap(directory, {"AccessPolicy.a.yaml": "engine: allow\n", "User.u.yaml": "name: Bea\n"}, 2)
    assert await store.version() != first.version
    assert (await store.load()).resources[("User", "u")]["name"] == "Bea"
