"""The benchmark suite's own plumbing (``python -m benchmarks``): no benchmark runs here.

Plots are drawn from a tiny synthetic results file shaped like what the scripts
write with ``--json``; the runner's argument parsing, step selection and results
merging are checked directly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from benchmarks import run_all

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu_model": "Test CPU", "cpu_flags": ["avx512f"], "cores": 2, "ram_gib": 8.0,
           "torch": "2.13.0+cpu", "date": "2026-12-01 16:00 UTC"}  # fmt: skip


def _core_size(gib: float, scale: float) -> dict:
    gb = int(gib * (1 << 30))
    speeds = {"shardckpt": 3.0, "dcp": 2.0, "torch-save": 2.5, "torch-ckpt": 1.5}
    ops = {op: {lib: {"median_s": gb / (v * scale * 1e9), "gbps": v * scale}
                for lib, v in speeds.items()}
           for op in ("save", "load_same", "reshard_2to3")}  # fmt: skip
    return {"gib": gib, "global_bytes": gb, "libs": list(speeds), "ops": ops, "ratios": {}}


def synthetic_results() -> dict:
    rows = [{"ranks": n, "phase": ph, "lib": lib, "seconds": 1e-3 * n * (2 if lib == "dcp" else 1)}
            for n in (8, 64, 512) for ph in ("plan", "manifest") for lib in ("shardckpt", "dcp")]  # fmt: skip
    codec = {d: {"raw_bytes": 1000, "ours-L1": {"ratio": r, "enc_gbs": 2.0, "dec_gbs": 5.0},
                 "zstd-1": {"ratio": r - 0.1, "enc_gbs": 0.8, "dec_gbs": 1.3},
                 "bound": {"ratio": r}}
             for d, r in (("minilm-fp32", 1.2), ("minilm-bf16", 1.5), ("minilm-fp16", 1.18))}  # fmt: skip
    entry = {"status": "ok", "mode": "quick", "machine": MACHINE}
    return {
        "schema": run_all.RESULTS_SCHEMA,
        "mode": "quick",
        "machine": MACHINE,
        "benchmarks": {
            "core": {**entry, "data": {"sizes": [_core_size(0.25, 1.0), _core_size(0.5, 1.1)],
                                       "torch_checkpointing": {"available": True}}},  # fmt: skip
            "async": {**entry, "data": {"rows": [
                {"size_bytes": s << 28, "ranks": 2, "stall_s": 0.02 * s, "memcpy_s": 0.015 * s,
                 "ratio": 1.33} for s in (1, 2, 4)]}},  # fmt: skip
            "codec": {**entry, "data": codec},
            "scale": {**entry, "data": {"rows": rows, "bytes_per_entry": {"shardckpt": 40.0},
                                        "slopes": {}}},  # fmt: skip
        },
    }


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_plots_from_synthetic_results(tmp_path: Path) -> None:
    from benchmarks import plots

    report = plots.plot_all(synthetic_results(), tmp_path)
    assert set(report) == {"throughput", "async_stall", "codec", "scale"}
    for name, msg in report.items():
        assert msg.startswith("wrote"), f"{name}: {msg}"
    for name in ("throughput", "async_stall", "codec", "scale"):
        png = tmp_path / f"{name}.png"
        w, h = _png_size(png)
        assert w >= 600 and h >= 300
        assert png.stat().st_size < 300_000
    from PIL import Image  # a dependency of matplotlib: decode every pixel, not just the header

    for png in tmp_path.glob("*.png"):
        with Image.open(png) as im:
            im.load()


def test_plots_skip_missing_and_unready_steps(tmp_path: Path) -> None:
    from benchmarks import plots

    res = synthetic_results()
    del res["benchmarks"]["scale"]
    res["benchmarks"]["async"] = {"status": "not-ready", "message": "no --json yet"}
    report = plots.plot_all(res, tmp_path)
    assert report["scale"].startswith("skipped") and "scale" in report["scale"]
    assert report["async_stall"].startswith("skipped") and "no --json yet" in report["async_stall"]
    assert report["throughput"].startswith("wrote")
    assert not (tmp_path / "scale.png").exists()


def test_footer_names_machine_date_and_caveat() -> None:
    from benchmarks import plots

    text = plots.footer_text({"machine": MACHINE, "mode": "quick"}, {})
    assert "Test CPU" in text and "2 cores" in text and "2026-12-01" in text
    assert "ratios carry over" in text


def test_parse_args_modes_and_sizes() -> None:
    quick = run_all.parse_args(["--quick"])
    assert quick.mode == "quick" and quick.sizes == run_all.QUICK_SIZES
    full = run_all.parse_args([])
    assert full.mode == "full" and full.sizes == run_all.FULL_SIZES
    assert min(full.sizes) == 0.25 and max(full.sizes) == 4.0
    assert run_all.parse_args(["--sizes", "0.25,1"]).sizes == (0.25, 1.0)
    assert run_all.parse_args(["--only", "core,codec"]).only == ["core", "codec"]
    for bad in (["--sizes", "0,1"], ["--sizes", "x"], ["--only", "nope"],
                ["--plots-only", "--no-plots"]):  # fmt: skip
        with pytest.raises(SystemExit):
            run_all.parse_args(bad)


def test_step_selection() -> None:
    names = lambda argv: [s.name for s in run_all.selected_steps(run_all.parse_args(argv))]  # noqa: E731
    quick = names(["--quick"])
    assert {"core", "async", "codec", "scale"} <= set(quick)
    assert "s3" not in quick and "many" not in quick
    assert {"s3", "many", "convert"} <= set(names([]))
    assert names(["--only", "codec,crc"]) == ["codec", "crc"]
    assert "core" not in names(["--quick", "--skip", "core"])


def test_merge_keeps_other_steps_and_earlier_numbers() -> None:
    old = synthetic_results()
    new = {"schema": run_all.RESULTS_SCHEMA, "mode": "quick", "machine": {"cpu_model": "New"},
           "benchmarks": {
               "codec": {"status": "ok", "data": {"x": 1}},
               "scale": {"status": "missing", "message": "no bench_scale.py"},
               "crc": {"status": "ok", "data": {"y": 2}}}}  # fmt: skip
    merged = run_all.merge_results(old, new)
    b = merged["benchmarks"]
    assert merged["machine"]["cpu_model"] == "New"
    assert b["codec"]["data"] == {"x": 1}  # replaced
    assert b["crc"]["data"] == {"y": 2}  # added
    assert b["core"] == old["benchmarks"]["core"]  # not run now: kept as it was
    assert b["scale"]["data"] == old["benchmarks"]["scale"]["data"]  # not runnable now: kept
    assert b["scale"]["latest_attempt"] == "no bench_scale.py"
    assert run_all.merge_results(None, new)["benchmarks"].keys() == new["benchmarks"].keys()
    # an old file of another schema is not merged into
    assert "core" not in run_all.merge_results({"schema": 0, "benchmarks": {"core": {}}}, new)[
        "benchmarks"
    ]


def test_run_step_reports_missing_and_not_ready(tmp_path: Path, monkeypatch) -> None:
    step = run_all.Step("ghost", "bench_does_not_exist.py", lambda m, s, o: [])
    entry = run_all.run_step(step, "quick", (0.25,), str(tmp_path), None)
    assert entry["status"] == "missing" and "does not exist" in entry["message"]
    assert entry["machine"]["cores"]

    monkeypatch.setattr(run_all, "_help_text", lambda script: "usage: --json PATH")
    step = run_all.Step("core", "bench_core.py", lambda m, s, o: [], needs=("--json", "--sizes"))
    entry = run_all.run_step(step, "quick", (0.25,), str(tmp_path), None)
    assert entry["status"] == "not-ready" and "--sizes" in entry["message"]


def test_run_step_reads_json_of_a_script(tmp_path: Path, monkeypatch) -> None:
    script = tmp_path / "bench_fake.py"
    script.write_text(
        "import json, sys\n"
        "out = sys.argv[sys.argv.index('--json') + 1]\n"
        "json.dump({'rows': [1, 2]}, open(out, 'w'))\n"
        "print('done')\n"
    )
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    step = run_all.Step("fake", "bench_fake.py", lambda m, s, o: ["--json", o], needs=())
    with open(tmp_path / "log.txt", "w+") as log:
        entry = run_all.run_step(step, "quick", (0.25,), str(tmp_path), log)
    assert entry["status"] == "ok" and entry["data"] == {"rows": [1, 2]}
    assert "--json" in entry["cmd"] and str(tmp_path / "fake.json") not in entry["cmd"]


def test_main_plots_only_writes_pngs(tmp_path: Path, capsys) -> None:
    (tmp_path / "results.json").write_text(json.dumps(synthetic_results()))
    assert run_all.main(["--plots-only", "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "async_stall.png", "codec.png", "scale.png", "throughput.png"]  # fmt: skip
    assert "plot throughput: wrote" in capsys.readouterr().out


def test_machine_info_fields() -> None:
    m = run_all.machine_info()
    assert {"cpu_model", "cores", "ram_gib", "torch", "date"} <= set(m)
    assert m["cpu_model"] and m["cores"] >= 1 and m["torch"]

