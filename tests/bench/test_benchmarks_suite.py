"""The benchmark suite's own plumbing (``python -m benchmarks``): no benchmark runs here.

Plots are drawn from a tiny synthetic results file shaped like what the scripts
write with ``--json``. What each figure shows is read back from its matplotlib
axes (line data, bar heights, point labels) and compared with the values this
file computes from the results itself, and with what ``plots.SERIES`` says the
plot draws; a test draws from perturbed results to show the comparison fails
when a plotted value is not the one in the results. The runner's argument
parsing, step selection and results merging are checked directly.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run_all

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu_model": "Test CPU", "cpu_flags": ["avx512f"], "cores": 2, "ram_gib": 8.0,
           "torch": "2.13.0+cpu", "date": "2026-12-01 16:00 UTC"}  # fmt: skip


OPS = ("save", "load_same", "reshard_2to3")


def _core_size(gib: float, scale: float) -> dict:
    gb = int(gib * (1 << 30))
    speeds = {"shardckpt": 3.0, "dcp": 2.0, "torch-save": 2.5, "torch-ckpt": 1.5}
    ops = {op: {lib: {"median_s": gb / (v * scale * (1 + k / 10) * 1e9), "gbps": v * scale * (1 + k / 10)}
                for lib, v in speeds.items()}
           for k, op in enumerate(OPS)}  # fmt: skip
    ratios = {op: {"shardckpt/dcp": ops[op]["dcp"]["median_s"] / ops[op]["shardckpt"]["median_s"]}
              for op in OPS}  # fmt: skip
    return {"gib": gib, "global_bytes": gb, "libs": list(speeds), "ops": ops, "ratios": ratios}


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
                {"size_bytes": s << 28, "ranks": 2, "stall_s": 0.02 * s + 0.001 * s * s,
                 "memcpy_s": 0.015 * s, "torch_copy_s": 0.03 * s,
                 "ratio": (0.02 + 0.001 * s) / 0.015} for s in (1, 2, 4)]}},  # fmt: skip
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


# ---------------------------------------------------------------------------
# What the plots show, against results.json
# ---------------------------------------------------------------------------


def _draw(results: dict, out_dir: Path, monkeypatch) -> dict[str, Any]:
    """Draw every plot; plot name -> its figure, kept as it was handed over to be saved."""
    from benchmarks import plots

    figs: dict[str, Any] = {}
    finish = plots._finish

    def keep(fig, axes, entry, res, path, note=None):
        figs[path.stem] = fig
        finish(fig, axes, entry, res, path, note)

    monkeypatch.setattr(plots, "_finish", keep)
    report = plots.plot_all(results, out_dir)
    assert all(msg.startswith("wrote") for msg in report.values()), report
    return figs


def _lines(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    return {ln.get_label(): ([float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()])
            for ln in ax.get_lines()}  # fmt: skip


def _bars(ax: Any) -> dict[str, list[float]]:
    return {c.get_label(): [float(p.get_height()) for p in c.patches] for c in ax.containers}


def _notes(ax: Any) -> dict[tuple[float, float], str]:
    """Point labels (annotations) by the data point they label."""
    from matplotlib.text import Annotation

    return {(float(t.xy[0]), float(t.xy[1])): t.get_text() for t in ax.texts if isinstance(t, Annotation)}


def _expected(results: dict) -> dict[str, list[dict]]:
    """What each plot must show, per axes, computed here from ``results`` alone."""
    from benchmarks.plots import LABELS

    b = results["benchmarks"]
    sizes = sorted(b["core"]["data"]["sizes"], key=lambda s: s["global_bytes"])
    gib = [s["global_bytes"] / (1 << 30) for s in sizes]
    throughput = [{
        "lines": {LABELS[lib]: (gib, [s["ops"][op][lib]["gbps"] for s in sizes]) for lib in sizes[0]["ops"][op]},
        "notes": {(x, s["ops"][op]["shardckpt"]["gbps"]): f"{s['ratios'][op]['shardckpt/dcp']:.2f}x DCP"
                  for x, s in zip(gib, sizes)},
    } for op in OPS]  # fmt: skip
    rows = sorted(b["async"]["data"]["rows"], key=lambda r: r["size_bytes"])
    xs = [r["size_bytes"] / (1 << 30) for r in rows]
    stall = [{"lines": {
        "shardckpt 2nd+ stall, 2 ranks": (xs, [r["stall_s"] for r in rows]),
        "torch.Tensor.copy_ of the same bytes": (xs, [r["torch_copy_s"] for r in rows]),
        "memcpy floor (same bytes, reused buffers, 2 ranks at once)": (xs, [r["memcpy_s"] for r in rows]),
    }, "notes": {(x, r["stall_s"]): f"{r['ratio']:.2f}x" for x, r in zip(xs, rows)}}]  # fmt: skip
    c = b["codec"]["data"]
    sets = ("minilm-fp32", "minilm-bf16", "minilm-fp16")
    codec = [{"bars": {"shardckpt byte-grouped zstd": [c[d]["ours-L1"]["ratio"] for d in sets],
                       "plain zstd -1": [c[d]["zstd-1"]["ratio"] for d in sets],
                       "order-0 entropy bound (byte planes)": [c[d]["bound"]["ratio"] for d in sets]}},
             {"bars": {f"{who} {what}": [c[d][name][field] for d in sets]
                       for name, who in (("ours-L1", "shardckpt"), ("zstd-1", "zstd -1"))
                       for field, what in (("enc_gbs", "encode"), ("dec_gbs", "decode"))}}]  # fmt: skip
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(b["scale"]["data"]["rows"], key=lambda r: r["ranks"]):
        pts = curves.setdefault(f"{r['lib']}: {r['phase']}", ([], []))
        pts[0].append(float(r["ranks"]))
        pts[1].append(r["seconds"])
    return {"throughput": throughput, "async_stall": stall, "codec": codec, "scale": [{"lines": curves}]}


def _close(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want) and all(math.isclose(g, w, rel_tol=1e-12) for g, w in zip(got, want)), \
        f"{what}: plotted {got}, results.json says {want}"


def _check_figure(name: str, fig: Any, expected: list[dict]) -> None:
    """Assert that ``fig`` shows exactly ``expected`` (per axes: lines, bars, point labels)."""
    assert len(fig.axes) == len(expected), f"{name}: {len(fig.axes)} axes"
    for i, (ax, want) in enumerate(zip(fig.axes, expected)):
        if "lines" in want:
            # the scale plot's labels carry a fitted slope: compare up to it
            got = {label.split(" (slope")[0]: xy for label, xy in _lines(ax).items()}
            assert set(got) == set(want["lines"]), f"{name}[{i}]: lines {sorted(got)}"
            for label, (wx, wy) in want["lines"].items():
                _close(got[label][0], wx, f"{name}[{i}] {label} x")
                _close(got[label][1], wy, f"{name}[{i}] {label} y")
        if "bars" in want:
            got_bars = _bars(ax)
            assert set(got_bars) == set(want["bars"]), f"{name}[{i}]: bars {sorted(got_bars)}"
            for label, heights in want["bars"].items():
                _close(got_bars[label], heights, f"{name}[{i}] {label}")
        if "notes" in want:
            assert _notes(ax) == want["notes"], f"{name}[{i}]: point labels"


def test_plots_show_the_values_of_results_json(tmp_path: Path, monkeypatch) -> None:
    results = synthetic_results()
    expected = _expected(results)
    figs = _draw(results, tmp_path, monkeypatch)
    assert set(figs) == set(expected)
    for name, fig in figs.items():
        _check_figure(name, fig, expected[name])


def test_plots_draw_exactly_their_series(tmp_path: Path, monkeypatch) -> None:
    """``plots.SERIES[name](results)`` is what plot ``name`` draws: same lines, bars and positions."""
    from benchmarks import plots

    results = synthetic_results()
    figs = _draw(results, tmp_path, monkeypatch)
    for name, fig in figs.items():
        panels = list(plots.SERIES[name](results).values())
        assert len(panels) == len(fig.axes)
        for ax, series in zip(fig.axes, panels):
            if ax.containers:  # bars: heights and centres
                drawn = [(c.get_label(), [p.get_x() + p.get_width() / 2 for p in c.patches],
                          [p.get_height() for p in c.patches]) for c in ax.containers]  # fmt: skip
            else:
                drawn = [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()]
            assert len(drawn) == len(series)
            for (label, xs, ys), s in zip(drawn, series):
                assert label == s.label
                _close(xs, s.xs, f"{name} {label} x")
                _close(ys, s.ys, f"{name} {label} y")


# One plotted value changed per plot: (plot, path to it in results, new value).
PERTURB = [
    ("throughput", ("core", "sizes", 1, "ops", "reshard_2to3", "dcp", "gbps"), 9.75),
    ("async_stall", ("async", "rows", 1, "memcpy_s"), 0.5),
    ("codec", ("codec", "minilm-bf16", "zstd-1", "dec_gbs"), 4.25),
    ("scale", ("scale", "rows", 5, "seconds"), 3.5),
]


@pytest.mark.parametrize(("plot", "path", "value"), PERTURB, ids=[p[0] for p in PERTURB])
def test_a_wrong_plotted_value_fails_the_check(tmp_path: Path, monkeypatch, plot: str, path: tuple,
                                               value: float) -> None:  # fmt: skip
    """Draw from results with one value changed: the check against the original results fails
    for that plot, and only that one (so the check above can fail, and fails for the right plot)."""
    results = synthetic_results()
    changed = copy.deepcopy(results)
    where: Any = changed["benchmarks"][path[0]]["data"]
    for k in path[1:-1]:
        where = where[k]
    assert where[path[-1]] != value
    where[path[-1]] = value
    expected = _expected(results)
    figs = _draw(changed, tmp_path, monkeypatch)
    for name, fig in figs.items():
        if name == plot:
            with pytest.raises(AssertionError):
                _check_figure(name, fig, expected[name])
        else:
            _check_figure(name, fig, expected[name])


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

