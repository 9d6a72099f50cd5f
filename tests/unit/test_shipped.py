"""The files the demo needs travel with the package: symlinks in a checkout, copies in a wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"demo.yaml": ROOT / "examples" / "demo.yaml", "envoy.yaml": ROOT / "envoy" / "envoy.yaml"}


def test_shipped_files_are_the_repository_files() -> None:
    for name, original in SHIPPED.items():
        packaged = ROOT / "authz_service" / "devstack" / "_shipped" / name
        assert packaged.is_symlink(), f"{packaged} must link to {original}, not copy it"
        assert packaged.resolve() == original.resolve()


@pytest.mark.slow  # builds a wheel
def test_the_wheel_carries_copies(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("authz_service-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name, original in SHIPPED.items():
            assert archive.read(f"authz_service/devstack/_shipped/{name}") == original.read_bytes()
