"""`authz-service explain`, run for real in a subprocess: the CI workflow of docs/policies.md on the
shipped example files, exit codes, a real token verified offline, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jwt as pyjwt
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "policies"
SECRET = "explain-cli-hmac-secret-0123456789abcdef"


def explain(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz_service", "explain", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_the_documented_example_passes_in_ci() -> None:
    result = explain("-c", str(EXAMPLE / "config.yaml"), "-r", str(EXAMPLE / "cases.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    cases = yaml.safe_load((EXAMPLE / "cases.yaml").read_text())
    lines = result.stdout.splitlines()
    assert len(lines) == len(cases)
    assert all(line.endswith("  ok") for line in lines), lines
    assert lines[0] == (
        "a patient reads their own record: GET /fhir/Patient/pt-1 -> allow (allowed) "
        "by policy 'patient-reads-own-record'  ok"
    )
    # docs/policies.md shows exactly these files and this command.
    docs = (ROOT / "docs" / "policies.md").read_text()
    assert (EXAMPLE / "cases.yaml").read_text().strip() in docs
    assert "authz-service explain -c examples/policies/config.yaml -r examples/policies/cases.yaml" in docs


def test_a_broken_expectation_fails_and_says_why(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        """
- name: practitioners may delete (they may not)
  request: {method: DELETE, path: /fhir/Patient/pt-1}
  identity: {introspector: keycloak, claims: {sub: dr-house}}
  expect: allow
- name: still fine
  request: {method: GET, path: /fhir/Patient/pt-1}
  identity: {introspector: keycloak, claims: {sub: pat-1, pid: pt-1}}
  expect: allow
"""
    )
    result = explain("-c", str(EXAMPLE / "config.yaml"), "-r", str(cases))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].endswith("FAIL: expected allow, got forbidden")
    assert '    - and[0] (matcho): operation.id: \'FhirDelete\' is not one of ["FhirRead", "FhirSearch"]' in lines
    assert lines[-1].endswith("  ok")
    assert "1 of 2 case(s) did not decide as expected" in result.stderr


def test_a_real_token_is_verified_as_check_verifies_it(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
introspectors:
  - {{id: app, type: jwt, jwt: {{iss: https://app.example.com, secret: {SECRET}}}}}
policies:
  - {{id: readers, engine: matcho, matcho: {{request-method: get, jwt: {{scope: '#(^| )read( |$)'}}}}}}
"""
    )
    token = pyjwt.encode(
        {"iss": "https://app.example.com", "sub": "u1", "scope": "read write", "exp": int(time.time()) + 300},
        SECRET,
        algorithm="HS256",
    )
    forged = pyjwt.encode({"iss": "https://app.example.com", "sub": "u1", "scope": "read"}, "x" * 40, algorithm="HS256")
    body = [
        {"name": "good", "request": {"path": "/x", "headers": {"authorization": f"Bearer {token}"}}, "expect": "allow"},
        {"name": "forged", "request": {"path": "/x", "headers": {"authorization": f"Bearer {forged}"}}},
    ]
    result = explain("-c", str(config), "-r", "-", "--json", stdin=json.dumps(body))
    assert result.returncode == 0, result.stderr
    good, bad = json.loads(result.stdout)
    assert (good["name"], good["decision"], good["policy"], good["user_id"]) == ("good", "allow", "readers", "u1")
    assert (bad["decision"], bad["reason"]) == ("unauthenticated", "bad_signature")
    assert token not in result.stdout
    assert forged not in result.stdout
    # One case is a list of one: the shape never depends on how many cases there were.
    single = explain("-c", str(config), "-r", "-", "--json", stdin=json.dumps(body[:1]))
    assert single.returncode == 0, single.stderr
    [only] = json.loads(single.stdout)
    assert only["name"] == "good"


def test_bad_input_exits_2_naming_it(tmp_path: Path) -> None:
    config = str(EXAMPLE / "config.yaml")
    result = explain("-c", config, "-r", str(tmp_path / "missing.yaml"))
    assert (result.returncode, result.stdout) == (2, "")
    assert "cannot read" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("- request: {path: /x}\n  expect: maybe\n")
    result = explain("-c", config, "-r", str(bad))
    assert result.returncode == 2
    assert "case 1: expect must be one of allow" in result.stderr
    bad.write_text("- request: {path: /x, user-id: u1}\n")
    result = explain("-c", config, "-r", str(bad))
    assert result.returncode == 2
    assert "case 1: request.user-id: the user comes from the token" in result.stderr
    bad.write_text("request: [\n")
    result = explain("-c", config, "-r", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    broken = tmp_path / "config.yaml"
    broken.write_text("policies: [{id: p, engine: sql}]\n")
    result = explain("-c", str(broken), "-r", str(EXAMPLE / "cases.yaml"))
    assert result.returncode == 2
    assert "policy 'p': engine must be matcho, json-schema, allow or complex, got 'sql'" in result.stderr
