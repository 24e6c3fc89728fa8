"""Counts the fault suite reports for ``docs/RELIABILITY.md``.

A counting test calls ``record(suite, **counts)`` once it has asserted its
outcome (a test that fails records nothing, so a figure is never reported for
a run that did not pass). When ``SHARDCKPT_FIGURES`` names a directory (set by
``benchmarks/reliability_report.py``), each record is appended there as one JSON
line; otherwise ``record`` does nothing, so plain test runs are unaffected.
Records from parallel xdist workers go to per-process files, never interleaved.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = ["record", "enabled"]


def enabled() -> bool:
    return bool(os.environ.get("SHARDCKPT_FIGURES"))


def record(suite: str, **counts: Any) -> None:
    """``suite`` names the table row group (e.g. ``"kill points"``); ``counts`` are
    JSON-serializable numbers or short strings (e.g. ``tried=40, phase="commit",
    torn_loadable=0``). Summed per (suite, non-numeric fields) by the report."""
    out = os.environ.get("SHARDCKPT_FIGURES")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    line = json.dumps({"suite": suite, "time": time.time(), **counts}, sort_keys=True)
    with open(os.path.join(out, f"figures-{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
        f.write(line + "\n")
