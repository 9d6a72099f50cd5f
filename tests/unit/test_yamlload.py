"""The strict YAML loader: safe tags only, no duplicate keys, no alias bombs, clear messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authz_service.config import yamlload
from authz_service.errors import ConfigError
from authz_service.registries import parse_config

# Aidbox's token introspection tutorial, "Cryptographic keys": the body has resourceType and id twice.
SEED_GUIDE_KEYS_EXAMPLE = """\
resourceType: TokenIntrospector
id: external-auth-server
resourceType: TokenIntrospector
id: with-keys
type: jwt
jwt:
  iss: https://auth.example.com
  keys:
    - k: very-secret-very-secret-very-secret
      kty: OCT
      alg: HS256
      format: plain
"""

BILLION_LAUGHS = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def error(text: str) -> yamlload.YamlError:
    with pytest.raises(yamlload.YamlError) as caught:
        yamlload.load(text)
    return caught.value


def test_plain_yaml_loads() -> None:
    assert yamlload.load("a: 1\nb: [x, {c: null}]\n") == {"a": 1, "b": ["x", {"c": None}]}
    assert yamlload.load("") is None
    assert yamlload.load("# only a comment\n") is None


def test_the_seed_guides_duplicate_id_is_refused_naming_the_key_and_lines() -> None:
    err = error(SEED_GUIDE_KEYS_EXAMPLE)
    assert not err.syntax
    assert err.message == "has the key 'resourceType' twice in one mapping (line 1 and line 3); keep one"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("id: a\nid: b\n", "'id'"),
        ("{id: a, id: b}", "'id'"),
        ("outer:\n  inner: {x: 1, x: 2}\n", "'x'"),
        ("- a: 1\n  a: 1\n", "'a'"),  # even with the same value: the author meant one of them
        ("1: a\n0x1: b\n", "1"),  # the same key once constructed
    ],
)
def test_duplicate_keys_anywhere_are_refused(text: str, key: str) -> None:
    assert f"has the key {key} twice" in error(text).message


def test_a_merge_key_may_override_what_it_merges() -> None:
    text = "base: &base {engine: matcho, description: x}\np:\n  <<: *base\n  description: y\n"
    assert yamlload.load(text)["p"] == {"engine": "matcho", "description": "y"}


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['echo hacked']\n",
        "a: !!python/name:os.system\n",
        "a: !!python/object:collections.OrderedDict {}\n",
        "a: !custom 1\n",
    ],
)
def test_tags_that_build_objects_are_refused(text: str) -> None:
    err = error(text)
    assert not err.syntax
    assert "could not determine a constructor" in err.message


def test_a_billion_laughs_is_refused_without_being_expanded() -> None:
    err = error(BILLION_LAUGHS)
    assert not err.syntax
    assert "alias bomb" in err.message


def test_a_few_aliases_are_fine() -> None:
    text = "shared: &s {uri: '#^/x'}\nuses: [*s, *s, *s]\n"
    assert yamlload.load(text)["uses"] == [{"uri": "#^/x"}] * 3


def test_an_alias_inside_itself_is_refused() -> None:
    assert "alias inside the node it refers to" in error("a: &loop [*loop]\n").message
    assert "alias inside the node it refers to" in error("a: &m {b: *m}\n").message


def test_nesting_is_bounded() -> None:
    deep = "a: " + "[" * (yamlload.MAX_DEPTH + 5) + "]" * (yamlload.MAX_DEPTH + 5)
    assert "nested deeper than" in error(deep).message
    fine = "a: " + "[" * 20 + "]" * 20
    assert yamlload.load(fine) is not None


def test_syntax_errors_say_where() -> None:
    err = error("a: 1\nb: [1, 2\nc: 3\n")
    assert err.syntax
    assert err.message.startswith("is not valid YAML at line ")


def test_a_stream_of_documents() -> None:
    assert yamlload.load_all("a: 1\n---\n- 2\n---\n") == [{"a": 1}, [2], None]
    with pytest.raises(yamlload.YamlError, match="twice"):
        yamlload.load_all("a: 1\n---\nb: 1\nb: 2\n")
    assert "is not valid YAML" in error("a: 1\n---\nb: 2\n").message  # load() takes one document


def test_parse_config_reports_duplicate_keys_as_check_config_problems() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("policies:\n  - id: p\n    id: q\n    engine: allow\n", {})
    assert [str(p) for p in caught.value.problems] == [
        "config: has the key 'id' twice in one mapping (line 2 and line 3); keep one"
    ]


def test_check_config_names_the_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("introspectors:\n  - " + SEED_GUIDE_KEYS_EXAMPLE.replace("\n", "\n    ").rstrip() + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "authz_service", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "config: has the key 'resourceType' twice in one mapping (line 2 and line 4); keep one" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_refuses_python_tags_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "config.yaml"
    path.write_text(f"users: !!python/object/apply:os.system ['touch {marker}']\n")
    result = subprocess.run(
        [sys.executable, "-m", "authz_service", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "could not determine a constructor" in result.stderr
    assert not marker.exists()
