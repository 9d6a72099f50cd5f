"""paths: the path a policy judges is the one the upstream routes; one read two ways is refused.

Each attack case is the request target an attacker sends (`curl --path-as-is 'http://h<target>'`)
and what the policy then judges: a path, or None (400 `ambiguous_path`).
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from authz_service.paths import normalized

ATTACKS = [
    # Dot segments are resolved: the policy judges what the upstream serves.
    ("/public/../admin/x", "/admin/x"),
    ("/public/./../admin", "/admin"),
    ("/a/./b", "/a/b"),
    ("/a/b/../c/./d/", "/a/c/d/"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/a/..", "/"),
    # ... but never above the root.
    ("/..", None),
    ("/../admin", None),
    ("/public/../../admin", None),
    # Encoded dots, slashes and backslashes: servers decode before or after they route.
    ("/public/%2e%2e/admin", None),
    ("/public/%2E%2E/admin", None),
    ("/public/..%2fadmin", None),
    ("/public/%2fadmin", None),
    ("/public/%5c..%5cadmin", None),
    ("/public/.%2e/admin", None),
    ("/public/file%2ejson", None),
    # ... twice, for servers that decode twice; overlong UTF-8 `.` and `/`.
    ("/public/%252e%252e/admin", None),
    ("/public/%252F", None),
    ("/public/..%253B/admin", None),  # `..;` to a servlet that decodes twice
    ("/public/%25%32%65%25%32%65/admin", None),  # `%252e%252e` once its digits are decoded
    ("/public/%c0%ae%c0%ae/admin", None),
    ("/public/%c0%af", None),
    # Backslash, NUL, fragment.
    ("/public/..\\admin", None),
    ("/public\\admin", None),
    ("/public/x\x00/../admin", None),
    ("/public/x%00", None),
    ("/admin#/../public/x", None),
    ("/public/x#y", None),
    # `;` with a dot segment: Tomcat strips `;...` from `..;`, nginx does not.
    ("/public/x;/../../admin", None),
    ("/x;/../admin", None),
    ("/..;/admin", None),
    ("/public/..;/admin", None),
    ("/public/..;jsessionid=1/admin", None),
    ("/public/.;/admin", None),
    ("/public/..%3b/admin", None),
    ("/public/x;a=1", "/public/x;a=1"),  # a path parameter alone is no dot segment
    # Absolute-form and network-path targets name a host the upstream may route by.
    ("http://h/admin", None),
    ("https://evil.example/admin?x=1", None),
    ("//host/x", None),
    ("//", None),
    ("*", None),
    ("", None),
    ("admin", None),
    ("?x=1", None),
    # Repeated slashes are merged (Envoy's merge_slashes) unless a dot segment makes the order matter.
    ("/a//b", "/a/b"),
    ("/a///b/", "/a/b/"),
    ("/public//../admin", None),
    ("/admin//../public/x", None),
    ("/a/.//b", None),
    # Encoded unreserved characters are decoded; other encodings kept, in upper case.
    ("/%41dmin", "/Admin"),
    ("/%61dmin/x", "/admin/x"),
    ("/a%2Db%5Fc%7Ed", "/a-b_c~d"),
    ("/a%20b", "/a%20b"),
    ("/a%3bb", "/a%3Bb"),
    ("/a%2541", "/a%2541"),  # a literal `%` followed by `41`: not `A`
    ("/caf%c3%a9", "/caf%C3%A9"),
    # Broken percent-encodings: servers keep, refuse or guess.
    ("/a%", None),
    ("/a%4", None),
    ("/a%zz", None),
    ("/a%%41", None),
    # The query is never touched.
    ("/a/../b?x=/../y&z=%2e", "/b?x=/../y&z=%2e"),
    ("/a?next=http://evil/..%2f", "/a?next=http://evil/..%2f"),
    ("/a//b?q=%41", "/a/b?q=%41"),
    # Already normal.
    ("/", "/"),
    ("/static/app.js", "/static/app.js"),
    ("/.well-known/openid-configuration", "/.well-known/openid-configuration"),
    ("/a/...", "/a/..."),  # three dots are a name
    ("/a/..b/.c", "/a/..b/.c"),
    ("/fhir/Patient/pt-1?_format=json", "/fhir/Patient/pt-1?_format=json"),
]


@pytest.mark.parametrize(("target", "judged"), ATTACKS, ids=[repr(target) for target, _ in ATTACKS])
def test_the_path_a_policy_judges(target: str, judged: str | None) -> None:
    assert normalized(target) == judged


def test_a_normal_path_is_returned_as_it_is() -> None:
    # The fast path copies nothing: check only replaces the request when the path changed.
    for target in ("/api/v1/users/7?x=%2e%2e", "/static/app.js", "/", "/a%20b", "/a?b/../c"):
        assert normalized(target) is target


# Paths drawn from the characters that matter: separators, dots, percent-encodings, `;`.
segment = st.one_of(
    st.sampled_from(
        ["", ".", "..", "...", "a", "B", "%41", "%2e", "%2F", "%3b", ";", "..;", "x;y", "%25", "%7e", "%", "%32", "%65"]
    ),
    st.text(alphabet="ab.;%2eEfF4157~-_", max_size=6),
)
paths = st.lists(segment, min_size=1, max_size=8).map(lambda parts: "/" + "/".join(parts))
targets = st.tuples(paths, st.one_of(st.just(""), st.text(alphabet="?&=/.%2ea", max_size=8).map("?".__add__))).map(
    "".join
)


@settings(max_examples=2000, deadline=None)
@given(targets)
@example("/a/b/../c/./d/?q=/../x")
@example("/a//b/")
@example("/%25%32%65")
def test_normalizing_twice_is_normalizing_once(target: str) -> None:
    judged = normalized(target)
    if judged is None:
        return
    path, _, query = judged.partition("?")
    assert normalized(judged) == judged
    assert query == target.partition("?")[2]  # the query is kept as it is
    assert path.startswith("/")
    assert "/../" not in path + "/"
    assert "/./" not in path + "/"
    assert "//" not in path


# Paths of plain names, dots and slashes, never repeated: RFC 3986's own algorithm is the oracle.
plain_segment = st.sampled_from(["a", "b", ".", "..", "c.d", "", "..."])
plain_paths = st.lists(plain_segment, min_size=1, max_size=8).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=1000, deadline=None)
@given(plain_paths)
def test_dot_segments_resolve_as_rfc_3986_says(path: str) -> None:
    if "//" in path:
        return
    # urljoin resolves dot segments by RFC 3986 5.2.4, dropping a `..` above the root; we refuse it.
    resolved = urlsplit(urljoin("http://h/", path)).path
    depth = 0
    above_root = False
    for part in path.split("/")[1:]:
        if part == "..":
            above_root = above_root or depth == 0
            depth = max(depth - 1, 0)
        elif part not in ("", "."):
            depth += 1
    assert normalized(path) == (None if above_root else resolved)
