"""Text formatting of the command line's tables (sizes, times, ages, metrics)."""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

__all__ = ["format_bytes", "format_when", "format_age", "format_metrics", "format_metadata", "print_table"]


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def format_when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def format_metrics(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'-' if v is None else format(v, '.6g')}" for k, v in m.items()) or "-"


def print_table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def format_metadata(metadata: dict[str, Any], limit: int = 200) -> str:
    """The metadata on one line, a long value (a trainer checkpoint's structure,
    ``shardckpt.tree``) summarised by its size: ``--json`` prints it whole."""
    if not metadata:
        return "-"
    shown = {}
    for k, v in metadata.items():
        text = json.dumps(v, ensure_ascii=False)
        shown[k] = v if len(text) <= limit else f"<{len(text)} characters; --json shows it>"
    return json.dumps(shown, ensure_ascii=False)
