#!/usr/bin/env python
"""Time a trainer spends checkpointing: shardckpt's integration vs the trainer's
native checkpoints, same model, same interval, 2 processes (gloo, CPU).

    python benchmarks/bench_integrations.py [--trainers lightning,transformers,accelerate]
        [--repeats 3] [--steps 20] [--interval 5] [--width 1024] [--json out.json]

Each trainer's worker (``benchmarks/integrations_<trainer>.py``, ``measure``)
runs a short training job in every rank of one ``torchrun`` launch and returns
the seconds that rank spent inside the trainer's save calls (for ``async`` also
the run's end waiting for the last commit); a run's figure is the slowest
rank's. Variants ``native``, ``sync``, ``async`` run interleaved in rotating
order, ``--repeats`` times each, a fresh directory per run; reported: medians
and the ratios ``sync / native`` (goal <= 0.7) and ``async / native`` (goal <= 0.3).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._common import machine_info, rotated, torchrun, write_json  # noqa: E402

__all__ = ["main", "VARIANTS", "GOALS"]

VARIANTS = ("native", "sync", "async")
GOALS = {"sync": 0.7, "async": 0.3}
NPROC = 2


def _worker(a: argparse.Namespace) -> None:
    """One rank of one run: the trainer's ``measure``, its seconds to ``--result.<rank>``."""
    module = importlib.import_module(f"benchmarks.integrations_{a.worker}")
    rank = os.environ.get("RANK", "0")
    seconds = module.measure(a.variant, a.out_dir, a.steps, a.interval, a.width)
    with open(f"{a.result}.{rank}", "w") as f:
        json.dump(seconds, f)
    # Skip interpreter finalization: freeing a DDP model's gloo group after the
    # trainer destroyed it can deadlock at exit on CPU (torch/gloo, seen under Accelerate).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _one(trainer: str, variant: str, a: argparse.Namespace, scratch: str) -> float:
    out_dir = tempfile.mkdtemp(prefix=f"{trainer}-{variant}-", dir=scratch)
    result = os.path.join(scratch, "result")
    torchrun(os.path.abspath(__file__), NPROC,
             ["--worker", trainer, "--variant", variant, "--out-dir", out_dir, "--result", result,
              "--steps", str(a.steps), "--interval", str(a.interval), "--width", str(a.width)], omp_threads=1)
    times = []
    for rank in range(NPROC):
        with open(f"{result}.{rank}") as f:
            times.append(float(json.load(f)))
        os.remove(f"{result}.{rank}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return max(times)


def _summary(runs: dict[str, list[float]]) -> dict[str, Any]:
    med = {v: statistics.median(t) for v, t in runs.items()}
    out: dict[str, Any] = {"runs_s": runs, "median_s": med}
    for v, goal in GOALS.items():
        ratio = med[v] / med["native"] if med["native"] > 0 else float("inf")
        out[f"{v}_over_native"] = ratio
        out[f"{v}_goal"] = goal
        out[f"{v}_met"] = ratio <= goal
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainers", default="lightning,transformers,accelerate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a)
        return 0
    scratch = tempfile.mkdtemp(prefix="bench-integrations-", dir=a.dir)
    results: dict[str, Any] = {"machine": machine_info(), "steps": a.steps, "interval": a.interval,
                               "width": a.width, "nproc": NPROC, "trainers": {}}
    try:
        for trainer in [t for t in a.trainers.split(",") if t]:
            runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for rep in range(a.repeats):
                for variant in rotated(list(VARIANTS), rep):
                    runs[variant].append(_one(trainer, variant, a, scratch))
            results["trainers"][trainer] = s = _summary(runs)
            print(f"{trainer}: native {s['median_s']['native']:.3f} s, sync {s['median_s']['sync']:.3f} s "
                  f"({s['sync_over_native']:.2f}x, goal <= {GOALS['sync']}), async {s['median_s']['async']:.3f} s "
                  f"({s['async_over_native']:.2f}x, goal <= {GOALS['async']})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(results, a.json, announce=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
