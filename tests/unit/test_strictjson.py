"""strictjson: JSON from untrusted bytes, read strictly (token segments, IdP answers)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from authz_service import strictjson
from authz_service.strictjson import MAX_DEPTH


def nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


@pytest.mark.parametrize(
    "data", [b'{"sub": "u", "exp": 1.5, "roles": ["a"]}', '{"sub": "u", "exp": 1.5, "roles": ["a"]}']
)
def test_plain_json_from_bytes_or_text(data: bytes | str) -> None:
    assert strictjson.loads(data) == {"sub": "u", "exp": 1.5, "roles": ["a"]}


def test_utf8_text_is_decoded() -> None:
    assert strictjson.loads('{"name": "Zoë"}'.encode()) == {"name": "Zoë"}


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"exp": NaN}', '{"exp": Infinity}', "[-Infinity]"])
def test_nan_and_infinity_are_not_json(text: str) -> None:
    # `exp: NaN` would compare false with everything: a token that never expires.
    with pytest.raises(ValueError, match="not JSON"):
        strictjson.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"sub": "alice", "sub": "admin"}',
        '{"a": {"x": 1, "x": 2}}',
        '[{"k": 1}, {"k": 1, "k": 1}]',
    ],
)
def test_duplicate_keys_are_rejected_at_any_depth(text: str) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        strictjson.loads(text)


def test_same_key_in_sibling_objects_is_fine() -> None:
    assert strictjson.loads('[{"k": 1}, {"k": 2}]') == [{"k": 1}, {"k": 2}]


@pytest.mark.parametrize("build", [nested_lists, nested_objects])
def test_nesting_up_to_the_limit_is_accepted(build: Callable[[int], str]) -> None:
    assert strictjson.loads(build(MAX_DEPTH)) is not None


@pytest.mark.parametrize("build", [nested_lists, nested_objects])
def test_nesting_past_the_limit_is_rejected(build: Callable[[int], str]) -> None:
    with pytest.raises(ValueError, match="deeper"):
        strictjson.loads(build(MAX_DEPTH + 1))


def test_limit_is_32() -> None:
    assert MAX_DEPTH == 32


def test_scalars_in_the_deepest_container_do_not_count_as_a_level() -> None:
    text = "[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH
    assert strictjson.loads(text) is not None


def test_absurd_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises((ValueError, RecursionError)):
        strictjson.loads(nested_lists(200_000))


@pytest.mark.parametrize(
    "data",
    [
        b'{"sub": "\xff"}',  # not UTF-8 at all
        '{"sub": "u"}'.encode("utf-16"),  # Python's json would sniff UTF-16; JWTs are UTF-8
        '{"sub": "u"}'.encode("utf-32"),
        '{"sub": "u"}'.encode("utf-16-le"),
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark is not JSON text either
    ],
)
def test_only_utf8_input(data: bytes) -> None:
    with pytest.raises((UnicodeDecodeError, json.JSONDecodeError)):
        strictjson.loads(data)


@pytest.mark.parametrize("text", ['{"sub": "\\ud800"}', '{"\\udfff": 1}', '["\\udc00\\ud800"]'])
def test_escaped_lone_surrogates_are_rejected(text: str) -> None:
    # An escaped lone surrogate parses to a str that cannot be encoded as UTF-8 again (RFC 7493
    # I-JSON 2.1: no unpaired surrogates). Accepted, it reaches the claims header encoder and
    # turns a signed token into an internal error (503) instead of a 401.
    with pytest.raises(ValueError):  # noqa: PT011  # loads' contract: a ValueError, whatever its message
        strictjson.loads(text)


def test_escaped_surrogate_pairs_are_fine() -> None:
    assert strictjson.loads('{"e": "\\ud83d\\ude00"}') == {"e": "\U0001f600"}


@pytest.mark.parametrize("text", ["", "{", '{"a": 1,}', "{'a': 1}", '{"a": 1} x'])
def test_malformed_text_is_a_value_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        strictjson.loads(text)
