"""How a token cache stores a value, the same for every backend: compact JSON text."""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> str:
    """A value as stored: compact JSON text."""
    return json.dumps(value, separators=(",", ":"))


def loads(text: str | bytes | None) -> Any:
    """A stored value back (None stays None: nothing stored)."""
    return None if text is None else json.loads(text)
