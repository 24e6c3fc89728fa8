"""README and docs state knob defaults; they must be knobs.py's. Every mention of a
knob followed by a value in brackets (``object_bytes`` (32 MiB), ``knobs.retry_attempts``
(8), ``shared_reads`` (``"auto"``) is parsed and compared with ``Knobs()``, so a
drift like "object_bytes is 64 MiB" in one place and 32 MiB in another fails here."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from shardckpt import knobs
from tests.helpers import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
NAMES = [f.name for f in fields(knobs.Knobs)]
_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
# `name` or `knobs.name`, then " (" or ", " and the value up to a comma, semicolon or bracket
_MENTION = re.compile(r"`(?:shardckpt\.)?(?:knobs\.)?(" + "|".join(NAMES) + r")`\s*[(,]\s*([^,;:)]+)")


def parse_value(text: str) -> int | str | None:
    """A documented default: ``4 MiB``, ``600``, ``"auto"`` (None: not a value, e.g. prose)."""
    text = text.strip().strip("`")
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    m = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB)?", text)
    return int(m.group(1)) * _UNITS[m.group(2) or ""] if m else None


def documented(path: Path) -> list[tuple[str, int | str, int]]:
    """(knob, value, line) for every knob default stated in ``path``."""
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        for m in _MENTION.finditer(line):
            value = parse_value(m.group(2))
            if value is not None:
                out.append((m.group(1), value, lineno))
    # mentions broken across lines: join each paragraph and look again
    text = re.sub(r"\s*\n\s*", " ", path.read_text())
    for m in _MENTION.finditer(text):
        value = parse_value(m.group(2))
        if value is not None and (m.group(1), value) not in {(k, v) for k, v, _ in out}:
            out.append((m.group(1), value, 0))
    return out


def test_parser_reads_the_forms_the_docs_use():
    assert parse_value("4 MiB") == 4 << 20 and parse_value("600") == 600 and parse_value('"auto"') == "auto"
    assert parse_value("see below") is None
    found = {(k, v) for k, v, _ in documented_text("`chunk_bytes` (4 MiB, env) and `knobs.part_bytes` (16 MiB;")}
    assert found == {("chunk_bytes", 4 << 20), ("part_bytes", 16 << 20)}


def documented_text(text: str) -> list[tuple[str, int | str, int]]:
    return [(m.group(1), v, 0) for m in _MENTION.finditer(text) if (v := parse_value(m.group(2))) is not None]


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_documented_knob_defaults_are_the_code_defaults(path: Path):
    defaults = knobs.Knobs()
    wrong = [f"{path.name}:{line or '?'} says {name} = {value!r}, knobs.py has {getattr(defaults, name)!r}"
             for name, value, line in documented(path) if getattr(defaults, name) != value]
    assert not wrong, "\n".join(wrong)


def test_readme_documents_every_knob():
    stated = {name for name, _, _ in documented(REPO_ROOT / "README.md")}
    assert stated == set(NAMES), f"README states no default for {sorted(set(NAMES) - stated)}"
