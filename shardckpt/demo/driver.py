"""``python -m shardckpt.demo.driver``: kill a sharded training job mid-save, resume it
at other world sizes, and check that nothing was lost or changed.

On CPU with gloo, every phase is a real ``torchrun`` job (``python -m
torch.distributed.run --standalone``) of ``shardckpt.demo.worker``: a small MLP
sharded with FSDP2 ``fully_shard`` (``--parallel ddp`` for DDP), AdamW, a
warmup+cosine LR schedule, a ``ResumableSampler``, all in one ``TrainState``,
saved every few steps by a ``CheckpointManager(async_save=True, keep_last=3)``.

1. reference: the whole run, uninterrupted, at 1 rank;
2. the job at 2 ranks, killed with SIGKILL (every process of it) at a random
   save step while that async save is being written;
3. resumed at 3 ranks from the newest valid checkpoint (the killed save must be
   incomplete and skipped), then preempted with SIGTERM: the manager saves the
   step it reached and exits 143;
4. resumed at 1 rank and run to the end.

Then a table, and the checks: the global sample sequence of the killed and
resumed job equals the reference's exactly (each epoch in its permutation's
order, nothing repeated or skipped); the final parameters are allclose to the
reference (``RTOL``/``ATOL``: changing the world size changes the order of
floating-point sums in the gradient reduction, nothing else); the killed save
left nothing loadable. Exit code 0 only if every check passes.

Landing a kill inside a ~20 ms write window by polling would be a race, so the
worker's rank 0, which commits the manifest, stops itself with SIGSTOP once
its save is known to be uncommitted; the driver then SIGKILLs every process of
the job (see ``shardckpt.demo.worker``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any

from ..manager.checkpoint_manager import CheckpointManager
from .checks import ATOL, RTOL, check_params, check_samples, global_batches
from .jobs import (
    Job,
    become_subreaper,
    kill_mid_save,
    last_step,
    preempt,
    read_json,
    run_to_end,
    started,
)
from .worker import DemoConfig

__all__ = ["main", "RTOL", "ATOL"]



def _notable(run_dir: str, phase: str) -> list[str]:
    """The manager's messages about the crash it recovered from, from a phase's log."""
    keys = ("taking over", "falling back", "removing incomplete")
    with open(os.path.join(run_dir, "logs", f"{phase}.log"), errors="replace") as f:
        return [line.strip() for line in f if any(k in line for k in keys)]


def _listing(start: dict[str, Any]) -> str:
    items = [f"{c['step']} {c['status']}" + (f" {c['size_bytes'] / 2**20:.1f} MB" if c["size_bytes"] else "")
             for c in start["before"]]
    return ", ".join(items) if items else "none"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardckpt.demo.driver", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="where to put checkpoints and logs (default: a fresh temp dir)")
    p.add_argument("--seed", type=int, default=None, help="picks the kill and preemption steps (default: random)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--quick", action="store_true", help="fewer steps (for tests)")
    p.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp",
                   help="FSDP2 fully_shard (default) or DDP")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 16)
    rng = random.Random(seed)
    cfg = DemoConfig(seed=seed, total_steps=24 if args.quick else 48, parallel=args.parallel)
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="shardckpt-demo-")
    if os.path.exists(work) and os.listdir(work):
        p.error(f"--workdir {work} is not empty")
    ours = not args.workdir or not os.path.exists(work)  # remove the directory itself only if we made it
    run_dir = os.path.join(work, "run")
    for d in ("samples", "markers", "pids", "logs"):
        os.makedirs(os.path.join(run_dir, d), exist_ok=True)
    root, ref_root = os.path.join(work, "ckpt"), os.path.join(work, "ckpt-reference")
    become_subreaper()
    t_start = time.perf_counter()
    print(f"shardckpt demo: {cfg.parallel.upper()} on CPU/gloo, {cfg.total_steps} steps of "
          f"{cfg.global_batch} samples, checkpoint every {cfg.save_interval} (async, keep_last=3), "
          f"seed {seed}, in {work}", flush=True)
    try:
        ok = _run(cfg, rng, run_dir, root, ref_root)
    finally:
        for job in started:
            if job.alive():
                job.kill()
        if not args.keep:
            for d in [work] if ours else [run_dir, root, ref_root]:
                shutil.rmtree(d, ignore_errors=True)
    print(f"total {time.perf_counter() - t_start:.1f} s" + (f"; files kept in {work}" if args.keep else ""))
    return 0 if ok else 1


def _run(cfg: DemoConfig, rng: random.Random, run_dir: str, root: str, ref_root: str) -> bool:
    """Run the four phases, print the table, return whether every check passed."""
    saves = range(2 * cfg.save_interval, cfg.total_steps // 2 + 1, cfg.save_interval)
    kill_at = rng.choice(list(saves))
    jitter_ms = rng.uniform(0.0, 10.0)
    jobs: dict[str, Job] = {}

    print("  [reference] 1 rank, uninterrupted ...", end=" ", flush=True)
    jobs["ref"] = Job(run_dir, ref_root, "ref", 1, cfg)
    run_to_end(jobs["ref"])
    print(f"{jobs['ref'].wall_s:.1f} s", flush=True)

    print(f"  [b] 2 ranks, SIGKILL mid-save at save step >= {kill_at} ...", end=" ", flush=True)
    jobs["b"] = Job(run_dir, root, "b", 2, cfg, ["--freeze-at", str(kill_at), "--jitter-ms", f"{jitter_ms:.3f}"])
    torn = kill_mid_save(jobs["b"])
    print(f"killed at step {torn['step']}, {jobs['b'].wall_s:.1f} s", flush=True)

    # A few steps past the killed one, and before the end even if the kill slipped to a later save.
    term_at = min(torn["step"] + rng.randint(2, 2 * cfg.save_interval - 1), cfg.total_steps - 2)
    print(f"  [c] 3 ranks, resume, SIGTERM to torchrun after step {term_at} ...", end=" ", flush=True)
    jobs["c"] = Job(run_dir, root, "c", 3, cfg)
    preempt(jobs["c"], term_at)
    print(f"{jobs['c'].wall_s:.1f} s", flush=True)

    print("  [d] 1 rank, resume and finish ...", end=" ", flush=True)
    jobs["d"] = Job(run_dir, root, "d", 1, cfg)
    run_to_end(jobs["d"])
    print(f"{jobs['d'].wall_s:.1f} s", flush=True)
    return _report(cfg, run_dir, root, jobs, torn, term_at)


def _report(cfg: DemoConfig, run_dir: str, root: str, jobs: dict[str, Job], torn: dict[str, Any],
            term_at: int) -> bool:
    st = {n: read_json(os.path.join(run_dir, f"{n}.start.json")) or {} for n in jobs}
    end = {n: read_json(os.path.join(run_dir, f"{n}.end.json")) or {} for n in jobs}
    r_c, r_d = st["c"].get("restored"), st["d"].get("restored")
    last_b, last_c = torn["last_step"], last_step(run_dir, "c")  # as logged by rank 0

    wall = {n: f"{j.wall_s:.1f} s" for n, j in jobs.items()}
    restore = {n: f"{st[n].get('restore_s', 0):.2f} s" for n in ("c", "d")}
    rows = [("phase", "ranks", "start step", "end step", "steps lost", "restore", "wall", "ended by"),
            ("reference", "1", "fresh", str(cfg.total_steps), "-", "-", wall["ref"], "finishing"),
            ("b", "2", "fresh", str(last_b), str(last_b - (r_c or 0)), "-", wall["b"],
             f"SIGKILL mid-save of step {torn['step']}"),
            ("c", "3", str(r_c), str(last_c), str(last_c - (r_d or 0)), restore["c"], wall["c"],
             f"SIGTERM: saved, exit {end['c'].get('exit_code')}"),
            ("d", "1", str(r_d), str(end["d"].get("last_step")), "-", restore["d"], wall["d"], "finishing")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print("\n  checkpoints each resume saw (mgr.list()):")
    print(f"    c: {_listing(st['c'])}  -> restored {r_c}")
    for line in _notable(run_dir, "c"):
        print(f"       c logged: {line.replace(root, '<root>')}")
    print(f"    d: {_listing(st['d'])}  -> restored {r_d}")
    with CheckpointManager(root) as mgr:
        final = mgr.list(deep=True)  # reads every chunk, checks every CRC32C
    print("    end: " + ", ".join(f"{i.step} {i.status} {(i.size_bytes or 0) / 2**20:.1f} MB" for i in final))
    print(f"  killed save: {torn['jitter_ms']:.1f} ms after save({torn['step']}) returned, "
          f"{torn['files']} shard file(s) with {torn['bytes'] / 2**20:.1f} MB on disk, "
          f"manifest: {'yes' if torn['manifest'] else 'no'}")

    checks = []
    # The job's history: each phase owns the steps from its restore to the next one's.
    b, c = global_batches(run_dir, "b", 2), global_batches(run_dir, "c", 3)
    history = [(b, 1, r_c or 0), (c, (r_c or 0) + 1, r_d or 0),
               (global_batches(run_dir, "d", 1), (r_d or 0) + 1, cfg.total_steps)]
    ok, msg = check_samples(cfg, global_batches(run_dir, "ref", 1), history)
    lost = range((r_c or 0) + 1, last_b + 1)  # trained at 2 ranks, lost, trained again at 3
    redone = all(s in b and b[s] == c.get(s) for s in lost)
    checks.append(("sample order", ok and redone, msg + f"; the {len(lost)} steps lost to the kill were redone "
                   + ("on the same samples" if redone else "on OTHER samples")))
    checks.append(("parameters", *check_params(cfg, os.path.join(run_dir, "ref.params.pt"),
                                                os.path.join(run_dir, "d.params.pt"))))
    before_c = {x["step"]: x["status"] for x in st["c"].get("before", [])}
    older = [s for s, status in before_c.items() if status == "valid" and s < torn["step"]]
    torn_ok = (not torn["manifest"] and torn["verify"].startswith("IncompleteCheckpointError")
               and before_c.get(torn["step"]) == "incomplete" and r_c == max(older, default=None))
    checks.append(("killed save", torn_ok,
                   f"step {torn['step']}: no manifest, verify() -> {torn['verify'].split(':')[0]}, listed "
                   f"{before_c.get(torn['step'])!r} and skipped: restore took step {r_c}, the newest valid"))
    code = end["c"].get("exit_code")
    pre_ok = end["c"].get("how") == "preempted" and code == 143 and r_d == last_c == end["c"].get("last_step")
    checks.append(("preemption", pre_ok, f"SIGTERM after step {term_at}: the workers saved step {r_d}, the "
                                         f"last they finished ({last_c - (r_d or 0)} lost), and exited {code}"))
    all_valid = bool(final) and all(i.valid for i in final) and final[-1].step == cfg.total_steps
    checks.append(("retention", all_valid and len(final) == 3,
                   f"{len(final)} checkpoints kept (keep_last=3), every chunk's CRC32C verified"))
    print("\n  checks:")
    for name, ok, msg in checks:
        print(f"    [{'PASS' if ok else 'FAIL'}] {name}: {msg}")
    passed = all(ok for _, ok, _ in checks)
    print(f"\n  {'ALL CHECKS PASSED' if passed else 'SOME CHECKS FAILED'}", flush=True)
    return passed


if __name__ == "__main__":
    sys.exit(main())
