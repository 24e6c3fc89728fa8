"""PNG plots of the suite's results (``docs/benchmarks/results.json``), matplotlib Agg.

    python -m benchmarks --plots-only          # redraw from the existing results.json

Each plot is two steps. A pure function of the results dict gives the data the
plot shows (:func:`throughput_series`, :func:`async_series`, :func:`codec_series`,
:func:`scale_series`, from ``benchmarks/_plot_series.py``; :data:`SERIES` maps
each plot to its function): panel -> list of :class:`Series`, each line or group
of bars with its x values, y values and point labels. The plot function
(``plot_*``, taking the results dict and an output folder and returning a
one-line message: what it drew, or why it skipped) draws exactly those series.
Every plot's footer names the machine (CPU model, cores), the date it was
measured and says that ratios carry over while absolute numbers are that
machine's: these VMs are shared, 2-core and change CPU between sessions.

Input shapes (what the scripts write with ``--json``):

* ``core``: ``{"sizes": [bench_core summary per state size], "libs", "torch_checkpointing"}``;
  a summary has ``global_bytes`` and ``ops[op][lib]["gbps"]``.
* ``async``: bench_async's rows ``{"size_bytes", "ranks", "stall_s", "memcpy_s", "ratio"}``
  (a list, or under ``"rows"``), optionally with a ``"variant"`` / ``"lib"`` field.
* ``codec``: bench_codec's ``{dataset: {contender: {"ratio", "enc_gbs", "dec_gbs"}}}``.
* ``scale``: ``{"rows": [{"ranks", "phase", "lib", "seconds"}], "bytes_per_entry", "slopes"}``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._plot_series import (
    CODEC_SPEED_BARS,
    GIB,
    LABELS,
    OPS,
    RATIO_WIDTH,
    SPEED_WIDTH,
    Panels,
    Series,
    async_rows,
    async_series,
    codec_series,
    codec_sets,
    core_libs,
    core_sizes,
    scale_rows,
    scale_series,
    throughput_series,
)
from benchmarks._plot_series import entry as _entry

__all__ = [
    "LABELS",
    "PLOTS",
    "SERIES",
    "Series",
    "async_series",
    "codec_series",
    "footer_text",
    "plot_all",
    "plot_async",
    "plot_codec",
    "plot_scale",
    "plot_throughput",
    "scale_series",
    "throughput_series",
]

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
# the async plot's reference curves; a stall curve is solid with markers, its variant's colour
FLOOR_STYLES = {"torch_copy": {"ls": ":", "color": "#7f7f7f", "lw": 1.4},
                "memcpy": {"ls": "--", "color": "black", "lw": 1.4}}  # fmt: skip
HATCH = {"enc_gbs": None, "dec_gbs": "//"}  # codec speed bars: decode hatched


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


def _log2_ticks(ax: Any, xs: list[float], fmt: str = "{:g}") -> None:
    """A log2 x axis with a tick (labelled ``fmt``) at each measured x."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [fmt.format(x) for x in xs])


def _draw_lines(ax: Any, series: list[Series], style: Callable[[Series], dict[str, Any]],
                note_style: Callable[[dict[str, Any]], dict[str, Any]]) -> None:  # fmt: skip
    """Each series as a line (``style(s)``: its keyword arguments), its notes at its points
    (``note_style(line keywords)``: theirs)."""
    for s in series:
        kw = style(s)
        ax.plot(s.xs, s.ys, label=s.label, **kw)
        for x, y, note in zip(s.xs, s.ys, s.notes):
            if note:
                ax.annotate(note, (x, y), textcoords="offset points", **note_style(kw))


# ---------------------------------------------------------------------------
# 1. save / load / reshard throughput vs state size
# ---------------------------------------------------------------------------


def plot_throughput(results: dict[str, Any], out_dir: Path) -> str:
    entry, why = _entry(results, "core")
    if entry is None:
        return f"skipped: {why}"
    sizes = core_sizes(results)
    if not sizes:
        return "skipped: core ran no size successfully"
    panels = throughput_series(results)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(OPS), figsize=(13, 4.4), sharey=True)
    for ax, (op, title) in zip(axes, OPS):
        _draw_lines(ax, panels[op], lambda s: {"marker": "o", "color": COLORS[s.key],
                                               "lw": 2.2 if s.key == "shardckpt" else 1.4},
                    lambda kw: {"xytext": (0, 7), "ha": "center", "fontsize": 7.5,
                                "color": COLORS["shardckpt"]})  # fmt: skip
        ax.set_title(title, fontsize=10)
        _log2_ticks(ax, [s["global_bytes"] / GIB for s in sizes])
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
    return f"wrote {path.name} ({len(sizes)} sizes, {', '.join(core_libs(sizes))})"


# ---------------------------------------------------------------------------
# 2. async stall vs size, with the memcpy floor
# ---------------------------------------------------------------------------


def _async_style(s: Series) -> dict[str, Any]:
    return FLOOR_STYLES.get(s.key) or {"marker": "o", "lw": 2, "color": COLORS.get(s.key)}


def plot_async(results: dict[str, Any], out_dir: Path) -> str:
    entry, why = _entry(results, "async")
    if entry is None:
        return f"skipped: {why}"
    rows = async_rows(entry["data"])
    if not rows:
        return "skipped: async results have no rows with size_bytes and stall_s"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    _draw_lines(ax, async_series(results)["stall"], _async_style,
                lambda kw: {"xytext": (4, 6), "fontsize": 8, "color": kw.get("color") or "black"})
    _log2_ticks(ax, sorted({r["size_bytes"] / GIB for r in rows}))
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


def _draw_codec(ax_r: Any, ax_s: Any, panels: Panels, data: dict[str, Any], sets: list[str]) -> None:
    ticks = (list(range(len(sets))), [d.replace("minilm-", "MiniLM ") for d in sets])
    for s in panels["ratio"]:
        bars = ax_r.bar(s.xs, s.ys, RATIO_WIDTH, label=s.label, color=COLORS[s.key])
        ax_r.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax_r.set_xticks(*ticks)
    ax_r.set_ylabel("compression ratio (raw / stored)")
    top = max((data[d].get(n, {}).get("ratio", 1.0) for d in sets for n in ("ours-L1", "bound")),
              default=1.5)  # fmt: skip
    ax_r.set_ylim(1.0, 1.0 + (top - 1.0) * 1.35)  # room for the labels and the legend
    ax_r.set_title("ratio per dtype", fontsize=10)
    ax_r.legend(fontsize=8, loc="upper right")
    ax_r.grid(alpha=0.3, axis="y")
    for s, (name, field, _) in zip(panels["speed"], CODEC_SPEED_BARS):
        hatch = HATCH[field]
        bars = ax_s.bar(s.xs, s.ys, SPEED_WIDTH, label=s.label, color=COLORS[name], hatch=hatch,
                        edgecolor="white", alpha=1.0 if hatch is None else 0.7)  # fmt: skip
        ax_s.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax_s.set_xticks(*ticks)
    ax_s.set_ylabel("GB/s of raw bytes, one core")
    ax_s.set_title("speed per dtype (4 MiB chunks, one thread)", fontsize=10)
    ax_s.set_ylim(0, ax_s.get_ylim()[1] * 1.25)
    ax_s.legend(fontsize=8, loc="upper center", ncol=2)
    ax_s.grid(alpha=0.3, axis="y")


def plot_codec(results: dict[str, Any], out_dir: Path) -> str:
    entry, why = _entry(results, "codec")
    if entry is None:
        return f"skipped: {why}"
    data = entry["data"]
    sets, note = codec_sets(data)
    if not sets:
        return "skipped: codec results have neither MiniLM nor Gaussian data sets"
    plt = _pyplot()
    fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(12, 4.4))
    _draw_codec(ax_r, ax_s, codec_series(results), data, sets)
    fig.suptitle("Compression on the real all-MiniLM-L6-v2 weights (fp32; bf16 / fp16 cast from it)",
                 fontsize=11)  # fmt: skip
    path = out_dir / "codec.png"
    _finish(fig, (ax_r, ax_s), entry, results, path, note)
    return f"wrote {path.name} ({', '.join(sets)})"


# ---------------------------------------------------------------------------
# 4. scale simulation: seconds vs ranks, log-log
# ---------------------------------------------------------------------------


def _bytes_per_entry_note(bpe: Any) -> str | None:
    if not isinstance(bpe, dict) or not bpe:
        return None
    flat = []
    for k, v in bpe.items():
        if isinstance(v, (int, float)):
            flat.append(f"{k} {v:.0f}")
        elif isinstance(v, dict):  # per world size: show the largest one measured
            nums = {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float))}
            if nums:
                top = max(nums, key=lambda x: float(x) if str(x).isdigit() else 0.0)
                flat.append(f"{k} {nums[top]:.0f} at {top} ranks")
    return "manifest bytes per (tensor, shard) entry: " + ", ".join(flat[:8]) if flat else None


def plot_scale(results: dict[str, Any], out_dir: Path) -> str:
    entry, why = _entry(results, "scale")
    if entry is None:
        return f"skipped: {why}"
    rows = scale_rows(entry["data"])
    if not rows:
        return "skipped: scale results have no rows with ranks, phase, lib and seconds"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.4))
    series = scale_series(results)["seconds"]
    phases = sorted({s.key.split("/", 1)[1] for s in series})
    cmap = plt.get_cmap("tab10")
    for s in series:
        lib, phase = s.key.split("/", 1)
        ours = lib == "shardckpt"
        ax.plot(s.xs, s.ys, marker="o" if ours else "s", ls="-" if ours else "--",
                color=cmap(phases.index(phase) % 10), lw=2 if ours else 1.3, label=s.label)  # fmt: skip
    _log2_ticks(ax, sorted({float(r["ranks"]) for r in rows}), "{:.0f}")
    ax.set_yscale("log")
    ax.set_xlabel("simulated ranks")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best", ncol=1 if len(series) <= 8 else 2)
    ax.set_title("Scale simulation (7B-like FSDP state + Adam): seconds per phase vs ranks\n"
                 "solid: shardckpt, dashed: DCP; slope = log-log fit (target <= 1.15)",
                 fontsize=10)  # fmt: skip
    path = out_dir / "scale.png"
    _finish(fig, ax, entry, results, path, _bytes_per_entry_note(entry["data"].get("bytes_per_entry")))
    return f"wrote {path.name} ({len(series)} curves)"


PLOTS = {
    "throughput": plot_throughput,
    "async_stall": plot_async,
    "codec": plot_codec,
    "scale": plot_scale,
}
# plot name -> the pure function giving the data it draws
SERIES = {
    "throughput": throughput_series,
    "async_stall": async_series,
    "codec": codec_series,
    "scale": scale_series,
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
