"""Locked builds: the test environment is uv.lock, and a lock that disagrees with pyproject.toml stops ./dev."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCK = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_installed_distribution_is_the_locked_version() -> None:
    # A package may be locked at more than one version (forks by Python version: numpy, contourpy).
    locked: dict[str, set[str]] = {}
    for package in LOCK["package"]:
        locked.setdefault(_normal(package["name"]), set()).add(package.get("version", ""))
    installed = {_normal(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert installed, "the test environment lists its distributions"
    strays = sorted(name for name in installed if name not in locked)
    assert not strays, f"installed but not in uv.lock: {strays}"
    drift = sorted(f"{n} {v} (lock {locked[n]})" for n, v in installed.items() if v not in locked[n])
    assert not drift, f"installed versions differ from uv.lock: {drift}"


def test_every_locked_artifact_carries_a_hash() -> None:
    artifacts = [
        artifact
        for package in LOCK["package"]
        for artifact in [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
    ]
    assert artifacts
    assert all(str(artifact.get("hash", "")).startswith("sha256:") for artifact in artifacts)


def test_dev_tools_are_pinned_exactly() -> None:
    tools = {_normal(re.split(r"[=<>!~\[; ]", spec)[0]): spec for spec in PYPROJECT["dependency-groups"]["test"]}
    for tool in ("ruff", "mypy", "pytest", "pytest-asyncio", "pytest-timeout", "grpcio-tools"):
        assert "==" in tools[tool], f"{tool} is pinned exactly: {tools[tool]}"


def test_no_warning_filter_names_a_library_warning_class() -> None:
    # A filter naming e.g. pydantic.warnings.PydanticDeprecatedSince212 breaks collection the day a
    # minor release removes the class; filters match messages and builtin categories instead.
    builtin = {"DeprecationWarning", "PendingDeprecationWarning", "UserWarning", "RuntimeWarning", "ResourceWarning"}
    for entry in PYPROJECT["tool"]["pytest"]["ini_options"]["filterwarnings"]:
        if entry == "error":
            continue
        category = entry.split(":")[2] if entry.count(":") >= 2 else ""
        assert category in builtin, entry


def test_every_test_has_a_time_bound() -> None:
    timeout = PYPROJECT["tool"]["pytest"]["ini_options"]["timeout"]
    assert 0 < int(timeout) <= 300


@pytest.mark.slow  # runs the ./dev script (uv resolves pyproject.toml against the lock)
def test_a_lock_that_disagrees_with_pyproject_stops_dev_in_one_line(tmp_path: Path) -> None:
    for name in ("dev", "uv.lock", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    tools = ROOT / ".tools"
    if tools.is_dir():  # the uv that ./dev installed here: the copy need not install it again
        (tmp_path / ".tools").symlink_to(tools)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(text.replace('"PyYAML>=6,<7",', '"PyYAML>=6,<7",\n    "idna>=2",'))
    assert (tmp_path / "pyproject.toml").read_text(encoding="utf-8") != text
    env = {**os.environ, "AUTHZ_VENV": str(tmp_path / "venv")}
    result = subprocess.run(
        ["bash", "dev", "setup"], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("dev:")]
    assert lines == ["dev: uv.lock does not match pyproject.toml: run ./dev lock and commit uv.lock"]
    assert not (tmp_path / "venv").exists(), "nothing is installed from a lock that does not match"
