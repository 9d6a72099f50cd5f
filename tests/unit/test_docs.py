"""The docs cite tests as proof (docs/security.md's tables above all): every cited test exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"])
_SPAN = re.compile(r"`([^`\n]+)`")
_FILE = re.compile(r"^(tests/[\w/]+\.py)(?:::(\w+))?")
_MORE = re.compile(r"^::(\w+)")


def citations(text: str) -> list[tuple[str, str | None]]:
    """(test file, test name or None) for every cited test; `::name` continues the last file named."""
    found: list[tuple[str, str | None]] = []
    last: str | None = None
    for span in _SPAN.findall(text):
        named = _FILE.match(span)
        if named is not None:
            last = named.group(1)
            found.append((last, named.group(2)))
            continue
        more = _MORE.match(span)
        if more is not None and last is not None:
            found.append((last, more.group(1)))
    return found


def test_the_citation_reader_reads_chains() -> None:
    text = "`tests/unit/test_a.py::test_x`, `::test_y`; `tests/e2e/test_b.py` and `::test_z[case]`"
    assert citations(text) == [
        ("tests/unit/test_a.py", "test_x"),
        ("tests/unit/test_a.py", "test_y"),
        ("tests/e2e/test_b.py", None),
        ("tests/e2e/test_b.py", "test_z"),
    ]


@pytest.mark.parametrize("doc", DOCS, ids=[path.name for path in DOCS])
def test_every_cited_test_exists(doc: Path) -> None:
    missing = []
    for file, name in citations(doc.read_text(encoding="utf-8")):
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
        elif name is not None and not re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"{doc.name} cites tests that do not exist: {missing}"
