#!/usr/bin/env python
"""Run the fault-injection and security suite and write its figures to docs/RELIABILITY.md.

    python benchmarks/reliability_report.py [--quick] [--out docs/RELIABILITY.md]

Runs the suite's counting tests with pytest (slow ones included unless
``--quick``), with ``SHARDCKPT_FIGURES`` pointing at a scratch directory: each
counting test appends a record there once its assertions have passed (see
``tests/figures.py``), so every figure comes from a passing test. Records are
summed per suite and per their non-numeric fields (phase, backend, ...);
fields that are extremes rather than counts (``seconds``, ``*_pct``,
``*_growth``) keep their maximum.

Every test that ran is counted too, from pytest's JUnit XML (:func:`outcomes`):
per test file, how many passed, failed, errored (in setup or teardown; a test
whose teardown fails counts once as passed or failed and once as an error, as
pytest counts it), were skipped and were expected failures. The report leads
with that table. A run in which tests failed or errored is written as well, its
result line says so, and the command exits 1; a run pytest could not complete
(interrupted, a collection error, a usage or internal error) writes nothing and
exits with pytest's status.
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
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the checkout's benchmarks package
    sys.path.insert(0, str(ROOT))

from benchmarks._common import cpu_model  # noqa: E402

SUITE = [
    "tests/faults/test_kill_points.py",
    "tests/faults/test_io_faults.py",
    "tests/faults/test_dying_rank.py",
    "tests/faults/test_bitflips.py",
    "tests/faults/test_manifest_fuzz.py",
    "tests/faults/test_full_disk.py",
    "tests/faults/test_permissions.py",
    "tests/faults/test_long_run.py",
    "tests/multirank/test_replicas.py",
    "tests/api/test_dcp_contract.py",
]
# What a reader should check in each table: the columns that must be zero.
MUST_BE_ZERO = ("torn_loadable", "earlier_lost", "undetected", "untyped", "hung", "committed",
                "partial_tensor", "partial_files", "failed", "lost")


# Test outcomes, in the order of the table's columns; those that must be 0 for a clean run.
OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed")
BAD_OUTCOMES = ("failed", "errors")
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


def _test_file(case: ET.Element, tests: list[str]) -> str:
    """The test file a JUnit ``testcase`` belongs to (a collection error names it in ``name``)."""
    dotted = case.get("classname") or case.get("name") or ""
    for t in tests:
        mod = t.removesuffix(".py").replace("/", ".")
        if dotted == mod or dotted.startswith(mod + "."):
            return t
    return dotted or "unknown"


def outcomes(junit_xml: str | Path, tests: list[str]) -> dict[str, Counter[str]]:
    """test file -> Counter of ``OUTCOMES``, from pytest's ``--junitxml`` report.

    A test's elements are merged first (pytest-xdist writes a teardown error as a
    second ``testcase`` of the same name). Its call counts once: failed, skipped,
    xfailed, or passed; not at all if its setup errored. Every setup, teardown or
    collection error counts once more under ``errors``.
    """
    children: dict[tuple[str, str, str], list[ET.Element]] = defaultdict(list)
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        key = (_test_file(case, tests), case.get("classname", ""), case.get("name", ""))
        children[key].extend(case)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for (path, _, _), elems in sorted(children.items()):
        tags = [e.tag for e in elems]
        errors = [e for e in elems if e.tag == "error"]
        counts[path]["errors"] += len(errors)
        if "failure" in tags:
            counts[path]["failed"] += 1
        elif "skipped" in tags:
            xfail = any(e.get("type") == "pytest.xfail" for e in elems if e.tag == "skipped")
            counts[path]["xfailed" if xfail else "skipped"] += 1
        elif all((e.get("message") or "").startswith("failed on teardown") for e in errors):
            counts[path]["passed"] += 1  # its call passed (a teardown error is counted above)
    order = {t: i for i, t in enumerate(tests)}  # the suite's order; files it does not list last
    return {p: Counter({k: counts[p][k] for k in OUTCOMES})
            for p in sorted(counts, key=lambda p: (order.get(p, len(tests)), p))}  # fmt: skip


def result_line(counts: dict[str, Counter[str]], records: int) -> str:
    """The report's result: "passed" only if no test failed or errored; the totals either way."""
    total: Counter[str] = sum(counts.values(), Counter())
    bad = {k: total[k] for k in BAD_OUTCOMES if total[k]}
    tally = ", ".join(f"{total[k]} {k}" for k in OUTCOMES if total[k]) or "no tests ran"
    if bad:
        return f"FAILED ({tally}); figures come only from the tests that passed; {records} records"
    return f"passed ({tally}); {records} records"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _render_outcomes(counts: dict[str, Counter[str]]) -> list[str]:
    """The table of test outcomes per file, with a total row."""
    out = ["## test outcomes", "", "| test file | " + " | ".join(OUTCOMES) + " |",
           "|" + "---|" * (len(OUTCOMES) + 1)]  # fmt: skip
    out += [f"| {path} | " + " | ".join(str(c[k]) for k in OUTCOMES) + " |" for path, c in counts.items()]
    total: Counter[str] = sum(counts.values(), Counter())
    out += ["| **total** | " + " | ".join(str(total[k]) for k in OUTCOMES) + " |", ""]
    return out


def render(tables: dict[str, list[dict[str, Any]]], meta: dict[str, str],
           counts: dict[str, Counter[str]] | None = None) -> str:  # fmt: skip
    """The Markdown report: header, the test outcomes (if given), then a table per suite."""
    out = ["# Reliability figures", "",
           "Written by `python benchmarks/reliability_report.py` from the fault-injection and "
           "security suite (the tests listed below). Every test that ran is counted under "
           "\"test outcomes\": passed, failed, errors (setup, teardown, collection), skipped and expected "
           "failures. Every figure is counted by a test after its assertions passed; a failing "
           "test records none, and a run with failures or errors says so in its result.", "",
           f"- Machine: {meta['machine']}", f"- Date: {meta['date']}", f"- Commit: {meta['commit']}",
           f"- Command: `{meta['command']}`", f"- Result: {meta['result']}", "",
           "Columns that must be 0: " + ", ".join(f"`{c}`" for c in dict.fromkeys((*BAD_OUTCOMES, *MUST_BE_ZERO)))
           + ".", ""]
    if counts is not None:
        out += _render_outcomes(counts)
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


def _run_suite(tests: list[str], args: argparse.Namespace,
               scratch: str) -> tuple[int, list[dict[str, Any]], dict[str, Counter[str]] | None]:  # fmt: skip
    """pytest over ``tests``: (its exit status, the figure records, outcomes per file or None)."""
    junit = os.path.join(scratch, "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", args.n, f"--junitxml={junit}", *tests]
    if args.quick:
        cmd += ["-m", "not slow"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, SHARDCKPT_FIGURES=scratch))
    records = [json.loads(line) for p in sorted(Path(scratch).glob("*.jsonl"))
               for line in p.read_text().splitlines() if line.strip()]  # fmt: skip
    counts = outcomes(junit, tests) if os.path.exists(junit) else None
    return proc.returncode, records, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the slow tests")
    ap.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"))
    ap.add_argument("-n", default="auto", help="pytest-xdist workers (default auto)")
    args = ap.parse_args()
    tests = [t for t in SUITE if (ROOT / t).exists()]
    with tempfile.TemporaryDirectory(prefix="figures_") as figs:
        rc, records, counts = _run_suite(tests, args, figs)
    if rc not in (0, 1) or counts is None:  # 1: tests failed; anything else: the run did not complete
        sys.exit(f"the suite did not complete (pytest exit {rc}); no report written")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    meta = {
        "machine": f"{cpu_model(platform.processor())}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "command": "python -m pytest -q -n " + args.n + " " + " ".join(tests) + (" -m 'not slow'" if args.quick else ""),
        "result": result_line(counts, len(records)),
    }
    Path(args.out).write_text(render(aggregate(records), meta, counts) + "\n")
    print(f"wrote {args.out} ({len(records)} records; {meta['result']})")
    if rc != 0 or any(c[k] for c in counts.values() for k in BAD_OUTCOMES):
        sys.exit(1)


if __name__ == "__main__":
    main()
