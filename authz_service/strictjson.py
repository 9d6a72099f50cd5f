"""JSON from untrusted bytes (token segments, IdP answers), read strictly.

Python's json accepts more than JSON: NaN and Infinity (a token with `exp: NaN` would never
expire), UTF-16/32 input (JWTs are UTF-8 by spec), duplicate keys (last one wins) and escaped lone
surrogates (`"\ud800"`, a str no UTF-8 encoder accepts: RFC 7493 I-JSON forbids them). Nesting is
bounded too, so no later recursive walk over claims can overflow the stack.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth_within(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def _encodable(value: Any) -> bool:
    """No string (key or value) holds a lone surrogate, which only a \\u escape can produce."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def loads(data: bytes | str) -> Any:
    """Parse strict JSON (UTF-8, no NaN/Infinity, no duplicate keys, at most MAX_DEPTH deep).

    Raises ValueError (UnicodeDecodeError and JSONDecodeError are ValueErrors) or RecursionError.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    if not _depth_within(value, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    # Only an escape can put a surrogate into the parsed text: skip the walk when there is none.
    if "\\u" in text and not _encodable(value):
        raise ValueError("unpaired surrogate escape")
    return value
