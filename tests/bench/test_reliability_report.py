"""benchmarks/reliability_report.py: how suite records become RELIABILITY.md tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
