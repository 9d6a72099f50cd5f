"""The path a policy judges: the one the upstream will route, or a refusal when parsers differ.

Policies match `uri` against the request path; the upstream routes the same request by its own
reading of it. The two must agree, so before anything else (decide.Authorizer.check) the path
part of the request target is brought to the form RFC 3986 6.2.2 calls normal, which is also what
Envoy's `normalize_path` and `merge_slashes` give the upstream:

- dot segments are resolved (RFC 3986 5.2.4): `/public/../admin/x` is judged as `/admin/x`;
- percent-encoded unreserved characters are decoded (`/%41dmin` is `/Admin`), every other
  percent-encoding is kept, its hex digits in upper case (`%3b` is `%3B`);
- repeated slashes are merged (`/a//b` is `/a/b`), as Envoy's `merge_slashes` and FHIR servers do.

A path that parsers read differently is refused (None; answered 400 `ambiguous_path`), never guessed:

- an encoded `/`, `\\` or `.` (`%2F`, `%5C`, `%2E`): some servers decode before they route, some
  after, and a decoded `%2E%2E` is a dot segment; the same characters, or `;`, encoded twice
  (`%252F`, `%253B`), for servers that decode twice; `%C0` and `%C1`, which only an overlong
  (invalid) UTF-8 encoding of `/` or `.` starts with; a `%` not followed by two hex digits;
- a backslash (a `/` to Windows servers and to WHATWG URL parsers), a NUL (literal or `%00`), a `#`
  (a fragment: a server may cut the path there);
- `;` (literal or `%3B`) together with a dot segment: servlet containers strip `;params` from each
  segment, so `/..;/admin` is `/../admin` to Tomcat and a plain segment to nginx, and
  `/x;/../admin` is `/x` to a parser that ends the path at the first `;`;
- repeated slashes together with a dot segment: merging before or after resolving gives different
  paths (`/public//../admin` is `/admin` merged first, `/public/admin` resolved first);
- a `..` above the root (`/../admin`): RFC 3986 drops it, a file server may not;
- a target that is not an absolute path: an absolute URI (`http://evil/admin`, which names a host
  the upstream may route by instead of Host) or `//host/x` (an authority to URL parsers), `*`, or nothing at all.

The query is kept exactly as it is. A path with none of `%`, `\\`, `;`, `#`, NUL, `//` and `/.`
is already normal and is returned as it is, after a few substring scans (the fast path).
"""

from __future__ import annotations

import re

_ENCODED = re.compile(r"%([0-9A-Fa-f]{2})?")
# `%25` (a literal `%`) before a refused encoding or `;`: one to a server that decodes twice.
_TWICE = re.compile(r"%25(?:2E|2F|5C|00|C0|C1|3B)", re.IGNORECASE)
# Decoded: RFC 3986's unreserved characters but `.` (an encoded `.` is refused, see above).
_DECODED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")
# Encodings refused outright: `.`, `/`, `\`, NUL, and the lead bytes of overlong UTF-8 `.` and `/`.
_REFUSED = frozenset({"2E", "2F", "5C", "00", "C0", "C1"})
_DOTS = (".", "..")


def normalized(target: str) -> str | None:
    """`target` (a path with its query) with its path normalized; `target` itself when it is
    already normal; None when the path can be read more than one way (the module docstring)."""
    path = target.partition("?")[0]
    # The fast path: nothing here needs work or a refusal (a `.` only matters at a segment's start).
    # Seven substring scans in C beat one regex search by half on a typical path.
    if (
        path[:1] == "/"
        and "%" not in path
        and "/." not in path
        and "//" not in path
        and ";" not in path
        and "\\" not in path
        and "#" not in path
        and "\x00" not in path
    ):
        return target
    raw, query = path, target[len(path) :]
    if path[:1] != "/" or path[:2] == "//" or "\\" in path or "\x00" in path or "#" in path:
        return None
    if "%" in path:
        decoded = _decoded(path)
        if decoded is None:
            return None
        path = decoded
    segments = path.split("/")[1:]
    dotted = any(segment in _DOTS for segment in segments)
    if (";" in path or "%3B" in path) and (
        # `..;x` and `..%3Bx` are `..` to servers that strip path parameters.
        dotted or any(segment.replace("%3B", ";").partition(";")[0] in _DOTS for segment in segments)
    ):
        return None
    if not dotted:
        if "//" not in path:
            return target if path == raw else path + query
    elif "" in segments[:-1]:
        return None  # `//` and a dot segment: merging first and resolving first disagree
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if not kept:
                return None  # above the root
            kept.pop()
        elif segment and segment != ".":
            kept.append(segment)
    # A path ending in a dot segment or a slash names a directory (RFC 3986 5.2.4: `/a/b/..` is `/a/`).
    slash = "/" if kept and segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(kept) + slash + query


def _decoded(path: str) -> str | None:
    """`path` with unreserved characters decoded and other encodings in upper case; None when an
    encoding is refused (see the module docstring)."""
    pieces: list[str] = []
    done = 0
    for found in _ENCODED.finditer(path):
        digits = found[1]
        if digits is None:
            return None  # `%` without two hex digits: some servers keep it, some refuse, some guess
        digits = digits.upper()
        if digits in _REFUSED:
            return None
        char = chr(int(digits, 16))
        pieces.append(path[done : found.start()])
        pieces.append(char if char in _DECODED else "%" + digits)
        done = found.end()
    pieces.append(path[done:])
    decoded = "".join(pieces)
    # Checked once decoded: `%25%32%65` is `%252e` after one decoding and `.` after two.
    return None if "%25" in decoded and _TWICE.search(decoded) else decoded
