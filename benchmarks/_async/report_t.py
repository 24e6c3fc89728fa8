"""``bench_async.py``'s table for phase T, the training loop (driver side).

:func:`report_t` prints the schedule the ranks ran (``windows``: checkpoint
intervals interleaved round-robin; ``runs``: whole runs), appends the slowdown
target (shardckpt async <= 1/3 of DCP async's slowdown) and returns the
``"training"`` part of the ``--json`` summary. Times are the maximum over ranks.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from benchmarks._async import BATCH, T_CONFIGS, MiB
from benchmarks._async.report import Targets
from benchmarks._common import med, verdict

__all__ = ["report_t"]


def _slowdown_target(slow: dict[str, float], every: int, targets: Targets) -> None:
    """Target: shardckpt async's slowdown <= 1/3 of DCP async's (undefined if DCP's is not positive)."""
    sa, da = slow["shardckpt-async"], slow["dcp-async"]
    if da > 0:
        ratio = sa / da
        val = f"{sa * 100:.1f}% / {da * 100:.1f}% = {ratio:.2f}x (sync: {slow['shardckpt-sync'] * 100:.1f}%)"
        ok = ratio <= 1 / 3
    else:
        val = f"{sa * 100:.1f}% vs DCP {da * 100:.1f}% (DCP slowdown not positive: ratio undefined)"
        ok = sa <= 0
    targets.append((f"training slowdown, async every {every} steps", val,
                    f"<= 1/3 of DCP's  {verdict(ok)}"))  # fmt: skip


def _report_runs(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Print the ``runs`` table; (median mean step s, slowdown) per config."""
    r0 = ranks[0]
    print(
        f"Phase T: MLP {r0['n_params'] / 1e6:.1f}M params + Adam ({r0['ckpt_bytes'] / MiB:.0f} MiB checkpoint, "
        f"replicated: each rank writes ~half), DDP on 2 gloo ranks, {r0['torch_threads']} torch thread(s)/rank; "
        f"{args.steps} steps, checkpoint every {args.every}; {args.train_rounds} round(s), order rotated; medians over rounds"
    )
    print(
        "  mean step = timed loop / steps, max over ranks (includes save calls and waits for the previous save); "
        "'plain step' = steps without a save call"
    )
    print()
    hdr = (
        f"{'config':16s} {'mean step ms':>12s} {'slowdown':>9s} {'plain step ms':>13s} {'save call s':>11s} "
        f"{'final wait s':>12s}  per round ms (slowdown vs that round's none)"
    )
    print(hdr)
    print("-" * len(hdr))

    def rounds(cfg: str) -> list[list[dict[str, Any]]]:  # per round, every rank's run of cfg
        return [[next(x for x in r["runs"] if x["cfg"] == cfg and x["round"] == rnd) for r in ranks]
                for rnd in range(args.train_rounds)]  # fmt: skip

    none_rounds = [max(x["mean_step"] for x in rr) for rr in rounds("none")]
    mean: dict[str, float] = {}
    slow: dict[str, float] = {}
    for cfg in T_CONFIGS:
        rr_all = rounds(cfg)
        per_round = [max(x["mean_step"] for x in rr) for rr in rr_all]
        mean[cfg] = med(per_round)
        plain = med([max(x["plain_step"] for x in rr) for rr in rr_all])
        calls = [max(x["ckpt_calls"][i] for x in rr) for rr in rr_all for i in range(len(rr[0]["ckpt_calls"]))]
        waits = med([max(x["final_wait"] for x in rr) for rr in rr_all])
        slow[cfg] = (mean[cfg] - mean["none"]) / mean["none"]
        round_slow = [(t - b) / b * 100 for t, b in zip(per_round, none_rounds)]
        print(
            f"{cfg:16s} {mean[cfg] * 1e3:12.1f} {slow[cfg] * 100:8.1f}% {plain * 1e3:13.1f} "
            f"{(med(calls) if calls else 0):11.3f} {waits:12.2f}  "
            + " ".join(f"{t * 1e3:.0f}" for t in per_round)
            + ("" if cfg == "none" else " (" + " ".join(f"{x:+.0f}%" for x in round_slow) + ")")
        )
    print(
        "  save call s = median time of a checkpoint call in the loop (state_dict + stall + wait for the previous save)"
    )
    print()
    return mean, slow


def _print_windows_head(args: argparse.Namespace, r0: dict[str, Any], n_win: int) -> None:
    k = args.every
    print(
        f"Phase T: MLP {r0['n_params'] / 1e6:.1f}M params + fused Adam ({r0['ckpt_bytes'] / MiB:.0f} MiB "
        f"checkpoint, replicated: each rank writes ~half), DDP on 2 gloo ranks, {r0['torch_threads']} "
        f"torch thread(s)/rank, batch {BATCH}; checkpoint every {k} steps"
    )
    print(
        f"  {n_win} checkpoint intervals per config ({n_win * k} steps), interleaved round-robin with the "
        "configs (order rotated); interval = save call + "
        f"{k} steps + wait for that save (what the next call would wait for); max over ranks"
    )
    print(
        "  step ms = median interval / steps; slowdown = (step - step_none) / step_none; "
        "also: steps alone (contention from the background write), save call and end wait"
    )
    print()
    hdr = (
        f"{'config':16s} {'step ms':>8s} {'mean ms':>8s} {'slowdown':>9s} {'steps-only ms':>13s} "
        f"{'save call s':>11s} {'end wait s':>10s}  {'slowdown by third of the run':s}"
    )
    print(hdr)
    print("-" * len(hdr))


def _report_windows(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Print the ``windows`` table; (median step s, slowdown) per config."""
    k = args.every
    n_win = max(1, args.steps // k) * args.train_rounds
    _print_windows_head(args, ranks[0], n_win)

    def per_win(cfg: str, field: str) -> list[float]:
        return [max(next(w[field] for w in r["windows"] if w["cfg"] == cfg and w["win"] == j) for r in ranks)
                for j in range(n_win)]  # fmt: skip

    step: dict[str, float] = {}
    slow: dict[str, float] = {}
    base = per_win("none", "total")
    for cfg in T_CONFIGS:
        tot = per_win(cfg, "total")
        step[cfg] = med(tot) / k
        slow[cfg] = (step[cfg] - step["none"]) / step["none"]
        thirds = []
        for part in range(3):
            sl = slice(part * n_win // 3, (part + 1) * n_win // 3)
            if tot[sl]:
                thirds.append((med(tot[sl]) - med(base[sl])) / med(base[sl]) * 100)
        print(
            f"{cfg:16s} {step[cfg] * 1e3:8.1f} {statistics.mean(tot) / k * 1e3:8.1f} "
            f"{slow[cfg] * 100:8.1f}% {med(per_win(cfg, 'steps')) / k * 1e3:13.1f} "
            f"{med(per_win(cfg, 'call')):11.3f} {med(per_win(cfg, 'wait')):10.3f}  "
            + ("" if cfg == "none" else " ".join(f"{x:+.0f}%" for x in thirds))
        )
    print(
        "  save call s = state_dict + stall (sync: the whole save); end wait s = the save still running "
        f"after {k} steps"
    )
    print()
    return step, slow


def report_t(args: argparse.Namespace, res: dict[str, Any], targets: Targets) -> dict[str, Any]:
    """Print phase T's table (whichever schedule ran); return the summary's ``training`` part."""
    ranks = res["ranks"]
    if "windows" in ranks[0]:
        step, slow = _report_windows(args, ranks)
        _slowdown_target(slow, args.every, targets)
        return {"mode": "windows", "step_s": step, "slowdown": slow}
    mean, slow = _report_runs(args, ranks)
    _slowdown_target(slow, args.every, targets)
    return {"mode": "runs", "mean_step_s": mean, "slowdown": slow}
