"""``bench_async.py``'s tables for phases C and S (driver side).

Each ``report_*`` takes the parsed arguments, the phase's results (``{"ranks":
[what each rank returned]}``) and the run's list of targets, prints its table,
appends its ``(name, value, verdict)`` targets and returns its part of the
``--json`` summary. A collective save waits for the slowest rank, so a save's
time is the maximum over ranks; statistics are medians over rounds.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._async import BUDGET_FRACTION, FLOOR_RATIO_TARGET, RSS_SLACK_MIB, S_VARIANTS, MiB
from benchmarks._common import med, verdict
from benchmarks._state import N_TENSORS, global_bytes

__all__ = ["Targets", "report_c", "report_s"]

Targets = list[tuple[str, str, str]]


def _worst(per_rank: list[dict[str, Any]], field: str) -> list[float]:
    """Per round, the slowest rank's ``field`` (a collective save waits for the slowest)."""
    n = len(per_rank[0]["records"])
    return [max(pr["records"][i][field] for pr in per_rank) for i in range(n)]


# ---------------------------------------------------------------------------
# Phase C
# ---------------------------------------------------------------------------


def _print_c_head(args: argparse.Namespace, world: int, r0: dict[str, Any]) -> str:
    """Phase C's explanation; returns the table header (printed too)."""
    print(
        f"Phase C: shardckpt.async_save 2nd+ stall vs the memory-copy floor; {world} gloo ranks, "
        f"{N_TENSORS} fp32 DTensors Shard(0); {args.copy_repeats} rounds per size, save and floors "
        "interleaved (order alternating per round), both ranks copying at once"
    )
    print(
        f"  copy backend {r0['copy_impl']}, {r0['copy_threads']} copy thread(s) per rank; "
        "per save / copy the max over ranks; medians over rounds"
    )
    print(
        "  memcpy = libc memcpy of each tensor into reused, pre-faulted buffers (the floor); "
        "kernel = shardckpt's copy kernel alone; copy_ = torch.Tensor.copy_"
    )
    print(
        "  ratio = median stall / median memcpy; paired = median over rounds of stall / memcpy "
        "of the same round"
    )
    print()
    hdr = (
        f"{'GiB':>5s} {'MiB/rank':>8s} {'1st s':>6s} {'stall ms':>8s} {'memcpy ms':>9s} "
        f"{'ratio':>6s} {'paired':>6s} {'kernel ms':>9s} {'copy_ ms':>8s} {'plan ms':>7s} "
        f"{'stage ms':>8s} {'GB/s/rank':>9s}  stalls / memcpys (ms)"
    )
    print(hdr)
    print("-" * len(hdr))
    return hdr


def _c_row(size: dict[str, Any], per_rank: list[dict[str, Any]], r0: dict[str, Any],
           world: int) -> dict[str, Any]:  # fmt: skip
    """One state size's JSON row, from every rank's records of it."""
    stall, memcpy = _worst(per_rank, "stall"), _worst(per_rank, "memcpy")
    m = {f: med(_worst(per_rank, f)) for f in ("stall", "memcpy", "kernel", "copy_")}
    for f in ("plan", "stage"):
        m[f] = med(_worst(per_rank, f)) if r0["breakdown"] else float("nan")
    return {
        "size_bytes": global_bytes(size["gib"]),
        "rank_bytes": max(pr["my_bytes"] for pr in per_rank),
        "ranks": world,
        "stall_s": m["stall"],
        "memcpy_s": m["memcpy"],
        "ratio": m["stall"] / m["memcpy"],
        "paired_ratio": med([a / b for a, b in zip(stall, memcpy)]),
        "first_stall_s": max(pr["first"]["stall"] for pr in per_rank),
        "kernel_s": m["kernel"],
        "torch_copy_s": m["copy_"],
        "plan_s": m["plan"],
        "stage_s": m["stage"],
        "stalls_s": stall,
        "memcpys_s": memcpy,
        "copy_impl": r0["copy_impl"],
        "copy_threads": r0["copy_threads"],
    }


def report_c(args: argparse.Namespace, res: dict[str, Any], targets: Targets) -> list[dict[str, Any]]:
    """Print phase C's table; return its JSON rows (one per state size)."""
    ranks = res["ranks"]
    r0 = ranks[0]
    _print_c_head(args, len(ranks), r0)
    rows: list[dict[str, Any]] = []
    for k, size in enumerate(r0["sizes"]):
        row = _c_row(size, [r["sizes"][k] for r in ranks], r0, len(ranks))
        rows.append(row)
        print(
            f"{size['gib']:5g} {row['rank_bytes'] / MiB:8.0f} {row['first_stall_s']:6.2f} "
            f"{row['stall_s'] * 1e3:8.1f} {row['memcpy_s'] * 1e3:9.1f} {row['ratio']:6.2f} "
            f"{row['paired_ratio']:6.2f} {row['kernel_s'] * 1e3:9.1f} {row['torch_copy_s'] * 1e3:8.1f} "
            f"{row['plan_s'] * 1e3:7.1f} {row['stage_s'] * 1e3:8.1f} "
            f"{row['rank_bytes'] / row['stall_s'] / 1e9:9.2f}  "
            + " ".join(f"{t * 1e3:.0f}" for t in row["stalls_s"])
            + " / "
            + " ".join(f"{t * 1e3:.0f}" for t in row["memcpys_s"])
        )
    print()
    for row in rows:
        targets.append((
            f"2nd+ stall vs memcpy floor, {row['rank_bytes'] / MiB:.0f} MiB/rank",
            f"{row['stall_s'] * 1e3:.1f} / {row['memcpy_s'] * 1e3:.1f} ms = "
            f"{row['ratio']:.2f}x (paired {row['paired_ratio']:.2f}x)",
            f"<= {FLOOR_RATIO_TARGET}x  {verdict(row['ratio'] <= FLOOR_RATIO_TARGET)}",
        ))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------
# Phase S
# ---------------------------------------------------------------------------


def _print_s_head(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> None:
    gb = global_bytes(args.gib)
    print(
        f"Phase S: {gb / (1 << 30):.2f} GiB fp32 in 16 DTensors Shard(0), {len(ranks)} gloo ranks "
        f"({ranks[0]['my_bytes'] / MiB:.0f} MiB per rank); {args.repeats} saves per variant, "
        "interleaved (order rotated per round), each to a fresh dir, committed before the next"
    )
    print(
        "  stall = call -> return (dcp-bgstage: -> staging done), per save the max over ranks; "
        "commit = call -> durable commit on all ranks"
    )
    mem = "VmHWM reset per save" if all(r["hwm_reset"] for r in ranks) else "RSS sampled / 2 ms"
    print(
        f"  peak +MiB = most RSS the variant held above a process that never saved with it ({mem}); "
        "held = kept between saves; max over ranks"
    )
    ref = ", ".join(f"r{i} {r['my_bytes'] / r['ref_copy_s'] / 1e9:.2f}" for i, r in enumerate(ranks))
    print(f"  reference: plain copy_ of a rank's shard into reused buffers, ranks at once: {ref} GB/s")
    print()


def _peak_and_held(recs: list[dict[str, Any]]) -> tuple[float, float]:
    """A rank's peak extra RSS over its saves of one variant, and the memory it kept between them."""
    held = 0  # memory this variant kept between its saves (pool / cache)
    peak = 0
    for x in recs:
        peak = max(peak, held + x["peak"] - x["rss_before"])
        held += x["rss_after"] - x["rss_before"]
    return peak, held


def _s_table(ranks: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Print a row per variant; (median 2nd+ stall, peak extra MiB, slowest rank's GB/s) per variant."""
    hdr = (
        f"{'variant':17s} {'1st stall':>9s} {'2nd+ stall':>10s} {'2nd+ per rank':>14s} "
        f"{'GB/s/rank':>9s} {'commit s':>8s} {'peak +MiB':>9s} {'held MiB':>8s}  2nd+ stalls (s)"
    )
    print(hdr)
    print("-" * len(hdr))
    med2: dict[str, float] = {}
    peak_extra: dict[str, float] = {}
    gbps_min: dict[str, float] = {}
    for v in S_VARIANTS:
        per_rank = [[x for x in r["records"] if x["variant"] == v] for r in ranks]
        n = len(per_rank[0])
        stall = [max(pr[i]["stall"] for pr in per_rank) for i in range(n)]
        commit = [max(pr[i]["commit"] for pr in per_rank) for i in range(n)]
        med2[v] = med(stall[1:])
        rank_med = [med([x["stall"] for x in pr[1:]]) for pr in per_rank]
        gbps_min[v] = min(r["my_bytes"] / m / 1e9 for r, m in zip(ranks, rank_med))
        peaks, helds = zip(*(_peak_and_held(pr) for pr in per_rank))
        peak_extra[v] = max(peaks) / MiB
        print(
            f"{v:17s} {stall[0]:9.3f} {med2[v]:10.3f} {'/'.join(f'{m:.3f}' for m in rank_med):>14s} "
            f"{gbps_min[v]:9.2f} {med(commit):8.2f} {peak_extra[v]:9.0f} {max(helds) / MiB:8.0f}  "
            + " ".join(f"{t:.3f}" for t in stall[1:])
        )
    return med2, peak_extra, gbps_min


def _print_s_split(ranks: list[dict[str, Any]]) -> None:
    """shardckpt's stall split into planning, staging and the rest, per rank."""
    print("  shardckpt stall split (median ms; 'other' = the rest, e.g. process-group creation):")
    for v in ("shardckpt", "shardckpt-budget"):
        for which, sl in (("1st", slice(0, 1)), ("2nd+", slice(1, None))):
            parts = []
            for i, r in enumerate(ranks):
                recs = [x for x in r["records"] if x["variant"] == v][sl]
                pl = med([x["plan"] for x in recs])
                stg = med([x["stage"] for x in recs])
                tot = med([x["stall"] for x in recs])
                parts.append(
                    f"r{i} plan {pl * 1e3:4.0f} + stage {stg * 1e3:4.0f} + other "
                    f"{(tot - pl - stg) * 1e3:4.0f} = {tot * 1e3:5.0f}"
                )
            print(f"    {v:16s} {which:4s}  " + "  |  ".join(parts))
    cp = min(r["my_bytes"] / med([x["stage"] for x in r["records"] if x["variant"] == "shardckpt"][1:])
             for r in ranks)  # fmt: skip
    print(f"    shardckpt 2nd+ staging copy alone (without planning): {cp / 1e9:.2f} GB/s (slowest rank)")


def _print_s_notes(ranks: list[dict[str, Any]], budget: int) -> None:
    """Below the table: DCP's background staging, return types, the stall split, probes, profile."""
    bg = [max(x["returned"] for x in r["records"] if x["variant"] == "dcp-bgstage") for r in ranks]
    print(
        f"  dcp-bgstage: async_save itself returned after <= {max(bg):.3f}s; "
        "its stall above waits for staging"
    )
    rtypes = sorted({f"{x['variant']}: {x['return_type']}" for r in ranks for x in r["records"]})
    print("  return types: " + "; ".join(rtypes))
    if all(r.get("breakdown") for r in ranks):
        _print_s_split(ranks)
    print(f"  shardckpt-budget: {budget / MiB:.0f} MiB per rank ({BUDGET_FRACTION} x shard)")
    print("  DCP staging options that need CUDA, tried on a tiny state:")
    for k, v in ranks[0]["probes"].items():
        print(f"    {k}: {v}")
    if ranks[0].get("profile"):
        print()
        print(ranks[0]["profile"].rstrip())
    print()


def report_s(args: argparse.Namespace, res: dict[str, Any], targets: Targets) -> dict[str, float]:
    """Print phase S's table and notes; return the median 2nd+ stall per variant."""
    ranks = res["ranks"]
    budget = max(r["budget"] for r in ranks)
    _print_s_head(args, ranks)
    med2, peak_extra, gbps_min = _s_table(ranks)
    _print_s_notes(ranks, budget)
    ratio = med2["shardckpt"] / med2["dcp"]
    targets.append((
        "2nd+ stall vs DCP async_save (default stager)",
        f"{med2['shardckpt']:.3f}s / {med2['dcp']:.3f}s = {ratio:.3f}x "
        f"(vs dcp-cached {med2['shardckpt'] / med2['dcp-cached']:.2f}x)",
        f"<= 0.2x  {verdict(ratio <= 0.2)}",
    ))  # fmt: skip
    targets.append((
        "staging GB/s per rank (2nd+ stall)",
        f"{gbps_min['shardckpt']:.2f} GB/s (slowest rank)",
        f">= 8  {verdict(gbps_min['shardckpt'] >= 8)}",
    ))  # fmt: skip
    lim = budget / MiB + RSS_SLACK_MIB
    targets.append((
        "budgeted peak extra RSS",
        f"{peak_extra['shardckpt-budget']:.0f} MiB (budget {budget / MiB:.0f}), "
        f"2nd+ stall {med2['shardckpt-budget']:.3f}s",
        f"<= {lim:.0f} MiB  {verdict(peak_extra['shardckpt-budget'] <= lim)}",
    ))  # fmt: skip
    return med2
