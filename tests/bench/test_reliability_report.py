"""benchmarks/reliability_report.py: how suite records become RELIABILITY.md tables, and how
every test that ran is counted (passed, failed, errors, skipped, xfailed) from pytest's JUnit XML."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests import figures

_SPEC = importlib.util.spec_from_file_location(
    "reliability_report", Path(__file__).resolve().parents[2] / "benchmarks" / "reliability_report.py")
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


def test_counts_sum_labels_group_extremes_keep_the_maximum_and_folded_fields_are_counted():
    recs = [
        {"suite": "kill points", "time": 1, "ranks": 1, "phase": "writing", "kind": "fresh", "tried": 3,
         "committed": 1, "seconds": 0.5},
        {"suite": "kill points", "time": 2, "ranks": 1, "phase": "writing", "kind": "overwrite", "tried": 2,
         "committed": 0, "seconds": 0.2},
        {"suite": "kill points", "time": 3, "ranks": 2, "phase": "writing", "kind": "fresh", "tried": 4},
    ]
    tables = report.aggregate(recs)
    assert tables == {"kill points": [
        {"phase": "writing", "ranks": "1", "kind (distinct)": 2, "tried": 5, "new_complete": 1, "seconds": 0.5},
        {"phase": "writing", "ranks": "2", "kind (distinct)": 1, "tried": 4},
    ]}
    md = report.render(tables, {"machine": "m", "date": "d", "commit": "c", "command": "x", "result": "ok"})
    assert "| **total** |  |  | 9 | 1 |  |" in md


def test_records_are_written_only_when_enabled(tmp_path, monkeypatch):
    monkeypatch.delenv("SHARDCKPT_FIGURES", raising=False)
    figures.record("s", tried=1)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("SHARDCKPT_FIGURES", str(tmp_path))
    figures.record("s", tried=2, phase="p")
    (f,) = tmp_path.iterdir()
    rec = json.loads(f.read_text())
    assert rec["suite"] == "s" and rec["tried"] == 2 and rec["phase"] == "p"


# What pytest-xdist writes (seen with pytest 8): a teardown error of a failed test is a second
# testcase of the same name; a passed test whose teardown fails has only the error.
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_kill_points" name="test_ok" />
<testcase classname="tests.test_kill_points.TestK" name="test_m[1]" />
<testcase classname="tests.test_kill_points" name="test_fail"><failure message="assert 0">x</failure></testcase>
<testcase classname="tests.test_kill_points" name="test_skip"><skipped type="pytest.skip" message="no">x</skipped></testcase>
<testcase classname="tests.test_kill_points" name="test_xf"><skipped type="pytest.xfail" message="" /></testcase>
<testcase classname="tests.test_io_faults" name="test_td"><error message="failed on teardown with &quot;E&quot;">x</error></testcase>
<testcase classname="tests.test_io_faults" name="test_su"><error message="failed on setup with &quot;E&quot;">x</error></testcase>
<testcase classname="tests.test_io_faults" name="test_td_fail"><failure message="assert 0">x</failure></testcase>
<testcase classname="tests.test_io_faults" name="test_td_fail"><error message="failed on teardown with &quot;E&quot;">x</error></testcase>
<testcase classname="" name="tests.test_bitflips"><error message="collection failure">x</error></testcase>
</testsuite></testsuites>"""
FILES = ["tests/test_kill_points.py", "tests/test_io_faults.py", "tests/test_bitflips.py"]


def _c(**kw: int) -> Counter:
    return Counter({k: kw.get(k, 0) for k in report.OUTCOMES})


def test_outcomes_count_failed_errored_skipped_and_passed_tests(tmp_path):
    (tmp_path / "junit.xml").write_text(JUNIT)
    counts = report.outcomes(tmp_path / "junit.xml", FILES)
    assert counts == {
        "tests/test_kill_points.py": _c(passed=2, failed=1, skipped=1, xfailed=1),
        "tests/test_io_faults.py": _c(passed=1, failed=1, errors=3),
        "tests/test_bitflips.py": _c(errors=1),
    }


def test_report_shows_failed_and_errored_tests(tmp_path):
    (tmp_path / "junit.xml").write_text(JUNIT)
    counts = report.outcomes(tmp_path / "junit.xml", FILES)
    result = report.result_line(counts, 7)
    assert result.startswith("FAILED") and "2 failed" in result and "4 errors" in result
    assert "3 passed" in result and "1 skipped" in result and "7 records" in result
    md = report.render({}, {"machine": "m", "date": "d", "commit": "c", "command": "x", "result": result},
                       counts)
    assert "| test file | passed | failed | errors | skipped | xfailed |" in md
    assert "| tests/test_io_faults.py | 1 | 1 | 3 | 0 | 0 |" in md
    assert "| **total** | 3 | 2 | 4 | 1 | 1 |" in md
    assert f"- Result: {result}" in md
    clean = {"tests/test_kill_points.py": _c(passed=5, skipped=1)}
    assert report.result_line(clean, 3) == "passed (5 passed, 1 skipped); 3 records"


def test_main_writes_a_failing_run_with_its_failures_and_exits_1(tmp_path, monkeypatch):
    """The real thing, small: pytest (with xdist, as the report runs it) over a file where one
    test passes and records a figure, one fails, one is skipped; the report is written and says so."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mini.py").write_text(
        "import json, os, pytest\n"
        "def test_counts():\n"
        "    with open(os.path.join(os.environ['SHARDCKPT_FIGURES'], 'f.jsonl'), 'a') as f:\n"
        "        f.write(json.dumps({'suite': 'mini', 'tried': 3, 'lost': 0}) + '\\n')\n"
        "def test_breaks():\n"
        "    assert 1 == 2\n"
        "def test_skipped():\n"
        "    pytest.skip('not here')\n"
    )
    out = tmp_path / "RELIABILITY.md"
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "SUITE", ["tests/test_mini.py"])
    monkeypatch.setattr(sys, "argv", ["reliability_report.py", "-n", "1", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        report.main()
    assert exit_.value.code == 1
    md = out.read_text()
    assert "- Result: FAILED (1 passed, 1 failed, 1 skipped); " in md
    assert "| tests/test_mini.py | 1 | 1 | 0 | 1 | 0 |" in md
    assert "## mini" in md and "| 3 | 0 |" in md  # the passing test's figures are still reported
