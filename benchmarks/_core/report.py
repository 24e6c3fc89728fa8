"""``bench_core.py``'s printed report and its ``--json`` summary, from the phases' results.

``results`` maps a phase letter to what its rank 0 wrote (see
:mod:`benchmarks._core.worker`) plus ``wall_s``. Throughput is global tensor
bytes / median seconds (1 GB = 1e9 B); a ratio is ours throughput / peer
throughput, i.e. peer median / ours median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

from benchmarks._core import OPS, PAIRS
from benchmarks._state import COLS, N_TENSORS, SRC_WORLD, global_bytes, rows_for

__all__ = ["report", "summary"]


def _op_result(results: dict[str, dict[str, Any]], op: str) -> dict[str, Any] | None:
    """The phase result that timed ``op`` (None if no phase did)."""
    return next((r for r in results.values() if op in r["times"]), None)


def _print_setup(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    """The report's head: the state, versions, method, CRC32C kernel and page-cache state."""
    import torch

    gb = global_bytes(args.gib)
    crcs = sorted({c for r in results.values() for c in r.get("crc", [])})
    crc = (crcs[0] + " (every rank of every phase)" if len(crcs) == 1
           else "MIXED across ranks/phases: " + ", ".join(crcs))  # fmt: skip
    print()
    print(
        f"shardckpt vs torch.distributed.checkpoint -- {gb / (1 << 30):.2f} GiB fp32 ({gb} B) in "
        f"{N_TENSORS} DTensors [{rows_for(args.gib)}x{COLS}] Shard(0), saved by {SRC_WORLD} gloo ranks on CPU"
    )
    print(
        f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPU(s); "
        f"{args.warmup} untimed warm-up + {args.repeats} timed runs per library, interleaved; "
        "times are rank 0 barrier-to-barrier, medians"
    )
    print(f"CRC32C implementation: {crc}")
    print(
        "DCP: FileSystemWriter(sync_files=True) / FileSystemReader; shardckpt: save()/load() defaults"
    )
    if not args.drop_caches:
        print("page cache: warm (loads right after saves read from the page cache for both libraries)")
        return
    drops = [d for r in results.values() for d in r.get("drop_caches", [])]
    bad = [d for d in drops if not d.get("ok")]
    if bad:
        print(f"page cache: --drop-caches FAILED ({bad[0].get('error')}); loads are warm")
        return
    freed = [d["cached_before_mib"] - d["cached_after_mib"] for d in drops
             if d.get("cached_before_mib") is not None and d.get("cached_after_mib") is not None]  # fmt: skip
    print(
        f"page cache: dropped before each of {len(drops)} loads, warm-ups included (worked; 'Cached' fell by "
        f"{min(freed):.0f}-{max(freed):.0f} MiB each time); a VM host may still cache the disk"
    )


def _print_op(op: str, title: str, res: dict[str, Any], libs: tuple[str, ...],
              gb: int) -> tuple[dict[str, float], bool]:  # fmt: skip
    """One operation's rows of the table; (median s per library, every load correct)."""
    med: dict[str, float] = {}
    all_correct = True
    for lib in libs:
        ts = res["times"][op][lib]
        med[lib] = statistics.median(ts)
        ws = " ".join(f"{t:.3f}" for t in res.get("warmup_times", {}).get(op, {}).get(lib, [])) or "-"
        ok = res["correct"].get(op, {}).get(lib)
        flag = "" if ok is None else ("  correct" if ok else "  WRONG DATA")
        all_correct = all_correct and ok is not False
        print(
            f"{title if lib == libs[0] else '':26s} {lib:14s} {med[lib]:9.3f} {gb / med[lib] / 1e9:7.2f} {ws:>9s}  "
            + " ".join(f"{t:.3f}" for t in ts)
            + flag
        )
    return med, all_correct


def _print_ratios(ratios: list[tuple[str, float, float | None]]) -> None:
    print("ratio = ours throughput / peer throughput (= peer median / ours median)")
    for title, ratio, target in ratios:
        if target is None:
            verdict = "(reported only)"
        else:
            verdict = f"target >= {target:.1f}x  {'MET' if ratio >= target else 'MISSED'}"
        print(f"  {title:52s} {ratio:5.2f}x   {verdict}")


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], total_s: float) -> bool:
    """Print the report; True if every load produced the right data."""
    gb = global_bytes(args.gib)
    libs = tuple(args.libs)
    _print_setup(args, results)
    print()
    hdr = f"{'operation':26s} {'lib':14s} {'median s':>9s} {'GB/s':>7s} {'warm-up s':>9s}  {'timed runs (s)':s}"
    print(hdr)
    print("-" * max(len(hdr), 78))
    ratios: list[tuple[str, float, float | None]] = []
    all_correct = True
    for op, (title, _, target) in OPS.items():
        res = _op_result(results, op)
        if res is None:
            continue
        med, ok = _print_op(op, title, res, libs, gb)
        all_correct = all_correct and ok
        for ours, peer in PAIRS:
            if ours in med and peer in med:
                tgt = target if (ours, peer) == ("shardckpt", "dcp") else None
                ratios.append((f"{title} [{ours} / {peer}]", med[peer] / med[ours], tgt))
    sizes = next((r["sizes"] for r in results.values() if "sizes" in r), None)
    if sizes:
        print()
        print("checkpoint size on disk: " + ", ".join(
            f"{lib} {sizes[lib] / 1e9:.3f} GB ({gb / sizes[lib]:.3f}x)" for lib in libs))  # fmt: skip
    print()
    _print_ratios(ratios)
    print()
    phase_walls = ", ".join(f"{p}: {r['wall_s']:.0f}s" for p, r in results.items())
    print(f"total wall time {total_s:.0f}s (phases incl. launch: {phase_walls})")
    if not all_correct:
        print("ERROR: a load produced wrong data (see WRONG DATA above)")
    return all_correct


def summary(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run as JSON-ready data: per operation and library, median s and GB/s; ratios."""
    gb = global_bytes(args.gib)
    ops: dict[str, Any] = {}
    ratios: dict[str, dict[str, float]] = {}
    for op in OPS:
        res = _op_result(results, op)
        if res is None:
            continue
        ops[op] = {}
        for lib in args.libs:
            ts = res["times"][op][lib]
            med = statistics.median(ts)
            ops[op][lib] = {
                "median_s": med,
                "gbps": gb / med / 1e9,
                "times_s": ts,
                "warmup_s": res.get("warmup_times", {}).get(op, {}).get(lib, []),
                "correct": res.get("correct", {}).get(op, {}).get(lib),
            }
        ratios[op] = {
            f"{ours}/{peer}": ops[op][peer]["median_s"] / ops[op][ours]["median_s"]
            for ours, peer in PAIRS
            if ours in ops[op] and peer in ops[op]
        }
    return {
        "gib": args.gib,
        "global_bytes": gb,
        "world_save": SRC_WORLD,
        "libs": list(args.libs),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "ops": ops,
        "ratios": ratios,
        "sizes_on_disk": next((r["sizes"] for r in results.values() if "sizes" in r), None),
        "crc": sorted({c for r in results.values() for c in r.get("crc", [])}),
        "wall_s": {p: r.get("wall_s") for p, r in results.items()},
    }
