#!/usr/bin/env python
"""Run the fault-injection and security suite and write its figures to docs/RELIABILITY.md.

    python benchmarks/reliability_report.py [--quick] [--out docs/RELIABILITY.md]

Runs the suite's counting tests with pytest (slow ones included unless
``--quick``), with ``SHARDCKPT_FIGURES`` pointing at a scratch directory: each
counting test appends a record there once its assertions have passed (see
``tests/figures.py``), so every figure comes from a passing test. Records are
summed per suite and per their non-numeric fields (phase, backend, ...);
fields that are extremes rather than counts (``seconds``, ``*_pct``,
``*_growth``) keep their maximum. The report fails (exit 1, no file written) if
pytest fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE = [
    "tests/test_kill_points.py",
    "tests/test_io_faults.py",
    "tests/test_dying_rank.py",
    "tests/test_bitflips.py",
    "tests/test_manifest_fuzz.py",
    "tests/test_full_disk.py",
    "tests/test_permissions.py",
    "tests/test_long_run.py",
    "tests/test_replicas.py",
    "tests/test_dcp_contract.py",
]
# What a reader should check in each table: the columns that must be zero.
MUST_BE_ZERO = ("torn_loadable", "earlier_lost", "undetected", "untyped", "hung", "committed",
                "partial_tensor", "partial_files", "failed", "lost")


# Numbers that name a row rather than count something.
LABELS = ("ranks",)
# Per suite: fields folded into one row (their distinct values are counted instead),
# so a table stays readable; and fields renamed where the generic name misleads.
COLLAPSE = {"io faults": ("site", "kind", "mode"), "kill points": ("kind", "mode")}
RENAME = {("kill points", "committed"): "new_complete"}  # a kill after the commit: the new step loads


def _is_extreme(field: str) -> bool:
    return (field in ("seconds", "max_seconds") or field.endswith("_pct") or field.endswith("_growth")
            or field.endswith("(distinct)"))


def aggregate(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """suite -> rows: records with equal non-numeric fields merged, counts summed."""
    rows: dict[str, dict[tuple[tuple[str, Any], ...], dict[str, Any]]] = defaultdict(dict)
    distinct: dict[tuple[str, tuple[tuple[str, Any], ...]], dict[str, set[Any]]] = defaultdict(lambda: defaultdict(set))
    for rec in records:
        suite = rec["suite"]
        rec = {RENAME.get((suite, k), k): (str(v) if k in LABELS else v) for k, v in rec.items()
               if k not in ("time", "suite")}
        folded = {k: rec.pop(k) for k in COLLAPSE.get(suite, ()) if k in rec}
        labels = tuple(sorted((k, v) for k, v in rec.items() if not isinstance(v, (int, float)) or isinstance(v, bool)))
        row = rows[suite].setdefault(labels, dict(labels))
        for k, v in folded.items():
            distinct[(suite, labels)][k].add(v)
            row[f"{k} (distinct)"] = len(distinct[(suite, labels)][k])
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if _is_extreme(k):
                    row[k] = max(row.get(k, v), v)
                else:
                    row[k] = row.get(k, 0) + v
    return {s: [r for _, r in sorted(by.items(), key=lambda kv: str(kv[0]))] for s, by in sorted(rows.items())}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def render(tables: dict[str, list[dict[str, Any]]], meta: dict[str, str]) -> str:
    out = ["# Reliability figures", "",
           "Written by `python benchmarks/reliability_report.py` from the fault-injection and "
           "security suite (the tests listed below). Every figure is counted by a test after its "
           "assertions passed; a failing test records nothing and fails the report.", "",
           f"- Machine: {meta['machine']}", f"- Date: {meta['date']}", f"- Commit: {meta['commit']}",
           f"- Command: `{meta['command']}`", f"- Result: {meta['result']}", "",
           "Columns that must be 0: " + ", ".join(f"`{c}`" for c in MUST_BE_ZERO) + ".", ""]
    for suite, rows in tables.items():
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        labels = [c for c in cols if any(isinstance(r.get(c), str) for r in rows)]
        cols = labels + [c for c in cols if c not in labels]
        out += [f"## {suite}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        totals = {c: sum(r.get(c, 0) for r in rows) for c in cols
                  if c not in labels and not _is_extreme(c)}
        if len(rows) > 1 and totals:
            out.append("| " + " | ".join("**total**" if i == 0 else _fmt(totals.get(c, ""))
                                         for i, c in enumerate(cols)) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the slow tests")
    ap.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"))
    ap.add_argument("-n", default="auto", help="pytest-xdist workers (default auto)")
    args = ap.parse_args()
    tests = [t for t in SUITE if (ROOT / t).exists()]
    with tempfile.TemporaryDirectory(prefix="figures_") as figs:
        cmd = [sys.executable, "-m", "pytest", "-q", "-n", args.n, *tests]
        if args.quick:
            cmd += ["-m", "not slow"]
        env = dict(os.environ, SHARDCKPT_FIGURES=figs)
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode != 0:
            sys.exit(f"the suite failed (pytest exit {proc.returncode}); no report written")
        records = [json.loads(line) for p in sorted(Path(figs).glob("*.jsonl"))
                   for line in p.read_text().splitlines() if line.strip()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    meta = {
        "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "command": "python -m pytest -q -n " + args.n + " " + " ".join(tests) + (" -m 'not slow'" if args.quick else ""),
        "result": f"passed; {len(records)} records",
    }
    Path(args.out).write_text(render(aggregate(records), meta) + "\n")
    print(f"wrote {args.out} ({len(records)} records)")


if __name__ == "__main__":
    main()
