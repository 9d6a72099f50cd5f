"""Tests for the `authz-service` command, run for real in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

LONG_SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef"

GOOD = f"""\
server:
  grpc_address: 127.0.0.1:9001
  admin_address: null
introspectors:
  - id: local
    resourceType: TokenIntrospector
    type: jwt
    jwt:
      iss: https://auth.example.com
      secret: {LONG_SECRET}
users:
  - id: alice
"""

BAD_PROBLEMS = [
    "introspector 'ext': cache_ttl must be between 1 and 86400, got 0",
    "introspector 'ext': jwt.iss is required",
    "cache: url is required when backend is redis",
    "response: user_id_header must not be the reserved header 'authorization'",
]


def bad_config(grpc_address: str = "127.0.0.1:9001") -> str:
    return f"""\
server:
  grpc_address: {grpc_address}
  admin_address: null
cache:
  backend: redis
response:
  user_id_header: Authorization
introspectors:
  - id: ext
    type: jwt
    cache_ttl: 0
    jwt:
      secret: {LONG_SECRET}
"""


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m authz_service ARGS` with a clean environment (no AUTHZ_* variables unless given)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    return subprocess.run(
        [sys.executable, "-m", "authz_service", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD, encoding="utf-8")
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(bad_config(), encoding="utf-8")
    return path


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port we keep listening on: a service that tried to serve there would fail to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------- check-config


def test_check_config_good_prints_one_summary_line(tmp_path: Path, good: Path) -> None:
    result = run_cli("check-config", str(good), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert "1 introspector(s)" in lines[0]
    assert "local" in lines[0]
    assert "1 user(s)" in lines[0]
    assert result.stderr == ""


def test_check_config_bad_lists_every_problem(tmp_path: Path, bad: Path) -> None:
    result = run_cli("check-config", str(bad), cwd=tmp_path)
    assert_clean_failure(result)
    for problem in BAD_PROBLEMS:
        assert problem in result.stderr, result.stderr
    problem_lines = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(problem_lines) == len(BAD_PROBLEMS), result.stderr
    assert result.stdout == ""


def test_check_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.yaml"
    result = run_cli("check-config", str(missing), cwd=tmp_path)
    assert_clean_failure(result)
    assert str(missing) in result.stderr
    assert "No such file" in result.stderr or "cannot read" in result.stderr
    assert result.stdout == ""


def test_check_config_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  grpc_address: 127.0.0.1:9001\n  workers: [1\n", encoding="utf-8")
    result = run_cli("check-config", str(path), cwd=tmp_path)
    assert_clean_failure(result)
    assert "not valid YAML" in result.stderr
    assert "line " in result.stderr


def test_check_config_non_utf8_file_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.replace("alice", "al\u00efce").encode("latin-1"))
    result = run_cli("check-config", str(path), cwd=tmp_path)
    assert_clean_failure(result)
    assert str(path) in result.stderr


def test_check_config_short_secret_warns_but_passes(tmp_path: Path) -> None:
    path = tmp_path / "short.yaml"
    path.write_text(GOOD.replace(LONG_SECRET, "secret"), encoding="utf-8")
    result = run_cli("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1
    assert "warning" in result.stderr.lower()
    assert "'local'" in result.stderr
    assert "secret" in result.stderr


def test_check_config_expands_the_process_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(GOOD.replace(LONG_SECRET, "${AUTHZ_TEST_SECRET}"), encoding="utf-8")
    ok = run_cli("check-config", str(path), cwd=tmp_path, env={"AUTHZ_TEST_SECRET": LONG_SECRET})
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    unset = run_cli("check-config", str(path), cwd=tmp_path)
    assert_clean_failure(unset)
    assert "introspectors[0].jwt.secret" in unset.stderr
    assert "AUTHZ_TEST_SECRET" in unset.stderr


def test_check_config_refuses_an_empty_file_and_a_config_without_introspectors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    result = run_cli("check-config", str(empty), cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "config: is empty" in result.stderr
    bare = tmp_path / "bare.yaml"
    bare.write_text("server: {admin_address: null}\n", encoding="utf-8")
    result = run_cli("check-config", str(bare), cwd=tmp_path)
    assert result.returncode == 2
    assert "introspectors: none configured" in result.stderr


def test_check_config_strict_turns_warnings_into_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "short.yaml"
    path.write_text(GOOD.replace(LONG_SECRET, "secret"), encoding="utf-8")
    assert run_cli("check-config", str(path), cwd=tmp_path).returncode == 0
    strict = run_cli("check-config", "--strict", str(path), cwd=tmp_path)
    assert strict.returncode == 2
    assert "warning:" in strict.stderr
    assert "--strict" in strict.stderr
    assert strict.stdout == ""


def test_check_config_warns_about_matcho_rules_no_request_can_match(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    policies = (
        "policies:\n"
        "  - {id: shouty, engine: matcho, matcho: {request-method: GET}}\n"
        "  - {id: typo, engine: matcho, matcho: {requst-method: get}}\n"
        "  - {id: loose, engine: matcho, matcho: {uri: '#/fhir/Patient'}}\n"
        "  - {id: fine, engine: matcho, matcho: {request-method: get, uri: '#^/fhir/Patient'}}\n"
    )
    path.write_text(GOOD + policies, encoding="utf-8")
    result = run_cli("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 policy(ies)" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: policy")]
    assert [line.split(":")[1].strip() for line in warnings] == ["policy 'shouty'", "policy 'typo'", "policy 'loose'"]
    assert "request-method is lower case" in warnings[0]
    assert "no request context has 'requst-method'" in warnings[1]
    assert "not anchored with '^'" in warnings[2]
    strict = run_cli("check-config", "--strict", str(path), cwd=tmp_path)
    assert strict.returncode == 2
    assert strict.stdout == ""
    assert "3 warning(s), and --strict makes them problems" in strict.stderr


def test_check_config_validates_a_resources_file_with_the_config(tmp_path: Path, good: Path) -> None:
    resources = tmp_path / "resources.yaml"
    resources.write_text(
        "- {resourceType: AccessPolicy, id: admins, engine: matcho, matcho: {uri: '#^/admin/'}}\n", encoding="utf-8"
    )
    ok = run_cli("check-config", str(good), "--resources", str(resources), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "1 policy(ies)" in ok.stdout
    assert f"with the resources of {resources}" in ok.stdout
    resources.write_text("- {resourceType: AccessPolicy, id: broken, engine: matcho}\n", encoding="utf-8")
    bad = run_cli("check-config", str(good), "--resources", str(resources), cwd=tmp_path)
    assert bad.returncode == 2
    assert_clean_failure(bad)
    assert "policy 'broken': matcho is required for engine matcho" in bad.stderr
    resources.write_text("- {resourceType: User, id: alice}\n", encoding="utf-8")
    clash = run_cli("check-config", str(good), "--resources", str(resources), cwd=tmp_path)
    assert clash.returncode == 2
    assert "User/alice defined by the config file" in clash.stderr


def test_check_config_refuses_a_zero_byte_file_and_warns_about_a_type_that_never_matches(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_bytes(b"")
    result = run_cli("check-config", str(empty), cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_failure(result)
    assert "config: is empty" in result.stderr
    path = tmp_path / "typed.yaml"
    path.write_text(GOOD + "policies:\n  - {id: numeric, engine: matcho, matcho: {uri: 42}}\n", encoding="utf-8")
    typed = run_cli("check-config", str(path), cwd=tmp_path)
    assert typed.returncode == 0, typed.stderr
    assert "warning: policy 'numeric': matcho.uri: 42 never matches: uri is always a string" in typed.stderr
    assert run_cli("check-config", "--strict", str(path), cwd=tmp_path).returncode == 2


def test_check_config_resources_refuses_what_the_api_refuses(tmp_path: Path, good: Path) -> None:
    # What `apply` sends as PUT / is refused there for a bad id or a resource given twice: here too.
    resources = tmp_path / "resources.yaml"
    resources.write_text(
        "- {resourceType: AccessPolicy, id: a, engine: matcho, matcho: {uri: '#^/a'}}\n"
        "- {resourceType: AccessPolicy, id: a, engine: matcho, matcho: {uri: '#^/b'}}\n",
        encoding="utf-8",
    )
    twice = run_cli("check-config", str(good), "--resources", str(resources), cwd=tmp_path)
    assert twice.returncode == 2
    assert_clean_failure(twice)
    assert "resource 2: AccessPolicy/a is in the file twice" in twice.stderr
    resources.write_text("- {resourceType: AccessPolicy, id: 'a b', engine: matcho, matcho: {uri: '#^/a'}}\n")
    bad_id = run_cli("check-config", str(good), "--resources", str(resources), cwd=tmp_path)
    assert bad_id.returncode == 2
    assert "resource 1 (AccessPolicy): id may only contain" in bad_id.stderr
    # A resources file's warnings are warnings of the check, --strict included.
    resources.write_text("- {resourceType: AccessPolicy, id: loose, engine: matcho, matcho: {uri: '#/a'}}\n")
    warned = run_cli("check-config", str(good), "--resources", str(resources), cwd=tmp_path)
    assert warned.returncode == 0, warned.stderr
    assert "warning: policy 'loose': matcho.uri: '#/a' is not anchored" in warned.stderr
    strict = run_cli("check-config", "--strict", str(good), "--resources", str(resources), cwd=tmp_path)
    assert strict.returncode == 2


def test_check_config_resources_reads_aidbox_bundles_as_apply_sends_them(tmp_path: Path, good: Path) -> None:
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(
        """\
resourceType: Bundle
type: transaction
entry:
  - request: {method: PUT, url: /AccessPolicy/admins}
    resource: {engine: matcho, matcho: {uri: '#^/admin/'}, mode: dry-run}
  - request: {method: POST, url: /User}
    resource: {email: bob@example.com}
  - request: {method: DELETE, url: /AccessPolicy/old}
""",
        encoding="utf-8",
    )
    ok = run_cli("check-config", str(good), "--resources", str(bundle), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "1 policy(ies), 2 user(s)" in ok.stdout
    assert "DELETE AccessPolicy/old is checked against the config file only" in ok.stderr
    bundle.write_text(
        bundle.read_text().replace("{engine: matcho, matcho: {uri: '#^/admin/'}, mode: dry-run}", "{engine: matcho}")
    )
    invalid = run_cli("check-config", str(good), "--resources", str(bundle), cwd=tmp_path)
    assert invalid.returncode == 2
    assert "policy 'admins': matcho is required for engine matcho" in invalid.stderr
    bundle.write_text(bundle.read_text().replace("url: /AccessPolicy/old", "url: /User/alice"))
    clash = run_cli("check-config", str(good), "--resources", str(bundle), cwd=tmp_path)
    assert clash.returncode == 2
    assert "DELETE User/alice defined by the config file" in clash.stderr
    bundle.write_text("resourceType: Bundle\ntype: batch\nentry:\n  - request: {method: PATCH, url: /User/x}\n")
    patch = run_cli("check-config", str(good), "--resources", str(bundle), cwd=tmp_path)
    assert patch.returncode == 2
    assert_clean_failure(patch)
    assert "entry 0: PATCH is not supported: PUT the whole resource" in patch.stderr


# --------------------------------------------------------------------------- running the service


def test_run_with_bad_config_refuses_before_binding(tmp_path: Path, held_port: int) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(bad_config(f"127.0.0.1:{held_port}"), encoding="utf-8")
    started = time.monotonic()
    result = run_cli("--config", str(path), cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert_clean_failure(result)
    for problem in BAD_PROBLEMS:
        assert problem in result.stderr, result.stderr
    # It never reached the point of serving: the held port would have made that fail differently.
    assert "cannot listen" not in result.stderr
    assert elapsed < 10, elapsed


@pytest.mark.parametrize("listener", ["grpc_address", "http_address", "admin_address"])
def test_a_busy_port_on_any_listener_is_one_line_and_exit_2(tmp_path: Path, held_port: int, listener: str) -> None:
    free = {name: f"127.0.0.1:{_free_port()}" for name in ("grpc_address", "http_address", "admin_address")}
    addresses = {**free, listener: f"127.0.0.1:{held_port}"}
    path = tmp_path / "busy.yaml"
    server = "".join(f"  {name}: {address}\n" for name, address in addresses.items())
    path.write_text(GOOD.replace("  grpc_address: 127.0.0.1:9001\n  admin_address: null\n", server), encoding="utf-8")
    result = run_cli("--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Event loop is closed" not in result.stderr
    # Every line that is not one of our JSON log lines (grpc's C++ core writes its own otherwise).
    plain = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert plain == [f"authz-service: cannot listen on 127.0.0.1:{held_port}: Address already in use"]


def test_a_busy_grpc_port_with_workers_stops_the_supervisor_with_exit_2(tmp_path: Path, held_port: int) -> None:
    # Every worker fails the same way; restarting them forever would hide it.
    path = tmp_path / "busy-workers.yaml"
    server = f"  grpc_address: 127.0.0.1:{held_port}\n  admin_address: null\n  workers: 2\n  drain_delay: 0\n"
    path.write_text(GOOD.replace("  grpc_address: 127.0.0.1:9001\n  admin_address: null\n", server), encoding="utf-8")
    result = run_cli("--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    problems = {line for line in result.stderr.splitlines() if line.startswith("authz-service:")}
    assert problems == {f"authz-service: cannot listen on 127.0.0.1:{held_port}: Address already in use"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_run_with_bad_config_from_env_refuses(tmp_path: Path, bad: Path) -> None:
    result = run_cli(cwd=tmp_path, env={"AUTHZ_CONFIG": str(bad)})
    assert_clean_failure(result)
    for problem in BAD_PROBLEMS:
        assert problem in result.stderr, result.stderr


def test_run_without_any_config_refuses(tmp_path: Path) -> None:
    result = run_cli(cwd=tmp_path)
    assert_clean_failure(result)
    assert "config" in result.stderr.lower()
    assert "--config" in result.stderr or "AUTHZ_CONFIG" in result.stderr


def test_run_with_missing_config_file_refuses(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = run_cli("--config", str(missing), cwd=tmp_path)
    assert_clean_failure(result)
    assert str(missing) in result.stderr


# --------------------------------------------------------------------------- apply --dry-run


class _RecordingApi:
    """A loopback HTTP server that records each request and answers one canned reply."""

    def __init__(self, status: int, body: str) -> None:
        import http.server
        import threading

        self.seen: list[tuple[str, str, str]] = []  # method, path, Authorization
        recording = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recording.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: pytest shows what the test asserts."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


DRY_RUN_ANSWER = (
    '{"resourceType": "OperationOutcome", "issue": ['
    '{"severity": "information", "code": "informational", "diagnostics": "dry run: nothing was written"}, '
    '{"severity": "information", "code": "informational", "diagnostics": "User/basic: created"}]}'
)


def test_apply_dry_run_sends_the_bulk_put_with_dry_run_and_says_nothing_was_written(tmp_path: Path) -> None:
    api = _RecordingApi(200, DRY_RUN_ANSWER)
    try:
        resources = tmp_path / "resources.yaml"
        resources.write_text("- {resourceType: User, id: basic}\n", encoding="utf-8")
        result = run_cli(
            "apply", "--dry-run", "-f", str(resources), "--url", api.url, cwd=tmp_path, env={"AUTHZ_API_TOKEN": "t0k"}
        )
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.splitlines() == [
            f"dry run: {api.url} answered HTTP 200, nothing was written",
            "  User/basic: created",  # the service's own dry-run line is the heading's, not repeated
        ]
        without = run_cli("apply", "-f", str(resources), "--url", api.url, cwd=tmp_path, env={"AUTHZ_API_TOKEN": "t0k"})
        assert without.stdout.splitlines()[0] == f"applied: {api.url} answered HTTP 200"
        assert api.seen == [("PUT", "/?_dry_run=true", "Bearer t0k"), ("PUT", "/", "Bearer t0k")]
    finally:
        api.close()


def test_apply_dry_run_rejected_exits_1_with_the_problems_on_stderr(tmp_path: Path) -> None:
    refusal = (
        '{"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid", '
        "\"diagnostics\": \"policy 'p': introspectors names unknown introspector 'nope'\"}]}"
    )
    api = _RecordingApi(422, refusal)
    try:
        resources = tmp_path / "resources.yaml"
        resources.write_text("- {resourceType: AccessPolicy, id: p, engine: allow}\n", encoding="utf-8")
        result = run_cli("apply", "--dry-run", "-f", str(resources), "--url", api.url, "--token", "t", cwd=tmp_path)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr.splitlines() == [
            f"rejected: {api.url} answered HTTP 422",
            "  error: policy 'p': introspectors names unknown introspector 'nope'",
        ]
        assert [path for _, path, _ in api.seen] == ["/?_dry_run=true"]
    finally:
        api.close()
