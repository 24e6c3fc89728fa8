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
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from ..errors import IncompleteCheckpointError
from ..format.manifest import MANIFEST_NAME
from ..manager.checkpoint_manager import CheckpointManager, step_dirname
from ..state import ResumableSampler
from .worker import DemoConfig, make_dataset, make_model

__all__ = ["main", "RTOL", "ATOL"]

#: Tolerance of the final-parameter comparison with the reference. The resumed job
#: ran at 2, 3 and 1 ranks, the reference at 1: per-rank partial gradients are
#: summed in a different order, which moves float32 results by a few ulps per
#: step, and AdamW carries that on. Measured max |diff|: 2e-7 to 5e-7. A real resume
#: bug is far above: one batch repeated at step 30 of 48 moves the final
#: parameters by 1.7e-3 (|threshold| = ATOL + RTOL * |p|, about 1.3e-5 here).
RTOL, ATOL = 1e-4, 1e-5
PHASE_TIMEOUT_S = 180.0
_jobs: list[Job] = []  # every job started, so that none outlives the driver (Ctrl-C included)


class Job:
    """One ``torchrun`` launch of the worker, in a session of its own."""

    def __init__(self, run_dir: str, root: str, phase: str, nproc: int, cfg: DemoConfig,
                 extra: list[str] | None = None) -> None:
        self.run_dir, self.root, self.phase, self.nproc = run_dir, root, phase, nproc
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "--max-restarts=0", "--monitor-interval=0.1",
               "-m", "shardckpt.demo.worker", "--root", root, "--run-dir", run_dir,
               "--phase", phase, "--config", json.dumps(dataclasses.asdict(cfg)), *(extra or [])]
        # Workers import the very package this driver runs from, installed or not.
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)}
        self.log_path = os.path.join(run_dir, "logs", f"{phase}.log")
        self._log = open(self.log_path, "wb")
        self.t0 = time.perf_counter()
        # Its own session: a kill of the job's process group never reaches this driver.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        _jobs.append(self)
        self.wall_s = 0.0

    def worker_pids(self) -> list[int]:
        pids = []
        for r in range(self.nproc):
            try:
                with open(os.path.join(self.run_dir, "pids", f"{self.phase}.r{r}")) as f:
                    pids.append(int(f.read()))
            except (FileNotFoundError, ValueError):
                pass
        return pids

    def signal_workers(self, sig: int) -> None:
        for pid in self.worker_pids():
            _signal_group(pid, sig)  # torchrun made each worker a session (group) leader

    def kill(self) -> None:
        """SIGKILL the agent and every worker at once, and wait until all are gone."""
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.signal_workers(signal.SIGKILL)
        self.wait(30)
        for pid in self.worker_pids():
            _reap(pid)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.wall_s = time.perf_counter() - self.t0
        self._log.close()
        return rc

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int, timeout: float = 15.0) -> None:
    """Wait until ``pid`` is gone. Its parent (the agent) was killed, so it was
    re-parented to us (a subreaper, when Linux allows) or to init."""
    try:
        os.waitpid(pid, 0)
        return
    except ChildProcessError:
        pass
    # A zombie still answers kill(pid, 0): a restarted manager would think the
    # owner of the root is alive. Wait for init to reap it.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    time.sleep(0.02)
                    continue
        except FileNotFoundError:
            return
        except OSError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)


def _become_subreaper() -> None:
    # Orphaned workers of a killed agent are then re-parented to this driver, which
    # reaps them at once, instead of to an init that may reap late.
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _last_step(run_dir: str, phase: str) -> int:
    """The newest step rank 0 of ``phase`` has logged as finished (0 if none)."""
    last = 0
    try:
        with open(os.path.join(run_dir, "samples", f"{phase}.r0.jsonl")) as f:
            for line in f:
                try:
                    last = json.loads(line)["step"]
                except ValueError:
                    break  # a line cut short by a kill
    except FileNotFoundError:
        pass
    return last


def _fail(job: Job, why: str) -> SystemExit:
    if job.alive():
        job.kill()
    return SystemExit(f"\nshardckpt demo: phase {job.phase} {why}\n--- last lines of its log ---\n"
                      f"{job.log_tail()}")


def run_to_end(job: Job) -> None:
    try:
        rc = job.wait(PHASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise _fail(job, f"did not finish in {PHASE_TIMEOUT_S:.0f} s") from None
    if rc != 0:
        raise _fail(job, f"failed with exit code {rc}")


def kill_mid_save(job: Job) -> dict[str, Any]:
    """Wait for rank 0 to freeze inside an uncommitted save, then SIGKILL the job."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    markers = os.path.join(job.run_dir, "markers")
    while time.monotonic() < deadline:
        if not job.alive():
            raise _fail(job, "ended before it could be killed mid-save")
        for name in sorted(os.listdir(markers)):
            info = _read_json(os.path.join(markers, name))
            if info is None or not name.startswith("frozen_"):
                continue
            os.kill(info["pid"], signal.SIGSTOP)  # make sure: it may still be on its way there
            step_dir = os.path.join(job.root, step_dirname(info["step"]))
            if os.path.exists(os.path.join(step_dir, MANIFEST_NAME)):
                os.remove(os.path.join(markers, name))
                os.kill(info["pid"], signal.SIGCONT)  # it committed in the instant before the stop
                continue
            job.kill()
            data = os.path.join(step_dir, "data")
            files = [os.path.getsize(os.path.join(data, n)) for n in os.listdir(data)] if os.path.isdir(data) else []
            try:
                from ..api import verify

                verify(step_dir)
                loadable = "verify() succeeded"
            except IncompleteCheckpointError as e:
                loadable = f"IncompleteCheckpointError: {e}"
            return {"step": info["step"], "jitter_ms": info["jitter_s"] * 1000, "files": len(files),
                    "bytes": sum(files), "manifest": os.path.exists(os.path.join(step_dir, MANIFEST_NAME)),
                    "verify": loadable, "last_step": _last_step(job.run_dir, job.phase)}
        time.sleep(0.002)
    raise _fail(job, "never froze mid-save")


def preempt(job: Job, at_step: int) -> None:
    """Once rank 0 finished ``at_step``, SIGTERM torchrun, as a scheduler preempting
    the node does: it forwards the signal to every worker once and waits for them
    (``--shutdown-timeout``); the workers save the step they reached and exit 143."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while _last_step(job.run_dir, job.phase) < at_step:
        if not job.alive():
            raise _fail(job, f"ended before step {at_step}")
        if time.monotonic() > deadline:
            raise _fail(job, f"did not reach step {at_step}")
        time.sleep(0.01)
    job.proc.send_signal(signal.SIGTERM)
    try:
        job.wait(60)
    except subprocess.TimeoutExpired:
        raise _fail(job, "did not exit after SIGTERM") from None


# ------------------------------------------------------------------------------ checks


def global_batches(run_dir: str, phase: str, world: int) -> dict[int, tuple[int, list[int]]]:
    """step -> (epoch, the step's samples in global-order position), from every rank's log.

    Rank ``r``'s ``j``-th sample of a step sits at position ``pos + j * world + r``."""
    per_step: dict[int, dict[int, dict[str, Any]]] = {}
    for r in range(world):
        path = os.path.join(run_dir, "samples", f"{phase}.r{r}.jsonl")
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    break
                per_step.setdefault(rec["step"], {})[r] = rec
    out = {}
    for step, recs in per_step.items():
        if len(recs) < world or len({rec["pos"] for rec in recs.values()}) != 1:
            continue  # cut short by the kill, or ranks disagreeing (then the step is missing)
        merged = [0] * sum(len(rec["idx"]) for rec in recs.values())
        for r, rec in recs.items():
            for j, i in enumerate(rec["idx"]):
                merged[j * world + r] = i
        out[step] = (recs[0]["epoch"], merged)
    return out


def check_samples(cfg: DemoConfig, ref: dict, phases: list[tuple[dict, int, int]]) -> tuple[bool, str]:
    """``phases``: (batches, first step it owns, last step it owns) of the killed/resumed job."""
    job: dict[int, tuple[int, list[int]]] = {}
    for batches, first, last in phases:
        for s in range(first, last + 1):
            if s in batches:
                job[s] = batches[s]
    steps = range(1, cfg.total_steps + 1)
    missing = [s for s in steps if s not in job or s not in ref]
    if missing:
        return False, f"no complete record of steps {missing[:5]}"
    diff = [s for s in steps if job[s] != ref[s]]
    if diff:
        return False, f"steps {diff[:5]} trained on other samples than the reference"
    order = ResumableSampler(range(cfg.dataset_len), seed=cfg.seed)
    by_epoch: dict[int, list[int]] = {}
    for s in steps:
        by_epoch.setdefault(job[s][0], []).extend(job[s][1])
    for e, seq in by_epoch.items():
        if seq != order.global_order(e)[: len(seq)].tolist():
            return False, f"epoch {e} is not a prefix of its permutation"
    n = sum(len(v) for v in by_epoch.values())
    return True, (f"{n} samples in {len(steps)} steps identical to the reference, in order; each epoch "
                  "follows its permutation with nothing repeated or skipped")


def check_params(cfg: DemoConfig, ref_path: str, got_path: str) -> tuple[bool, str]:
    ref = torch.load(ref_path, weights_only=True)
    got = torch.load(got_path, weights_only=True)
    init = make_model(cfg).state_dict()
    if set(ref) != set(got):
        return False, f"different parameter names: {sorted(set(ref) ^ set(got))}"
    max_diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    ok = all(torch.allclose(got[k], ref[k], rtol=RTOL, atol=ATOL) for k in ref)
    losses = []
    ds = make_dataset(cfg)
    for sd in (ref, got):
        model = make_model(cfg)
        model.load_state_dict(sd)
        with torch.no_grad():
            losses.append(torch.nn.functional.mse_loss(model(ds.tensors[0]), ds.tensors[1]).item())
    return ok, (f"allclose(rtol={RTOL:g}, atol={ATOL:g}): max |diff| {max_diff:.1e} (training moved "
                f"them by up to {moved:.1e}); dataset loss {losses[1]:.5f} vs reference {losses[0]:.5f}")


# ------------------------------------------------------------------------------- driver


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
    _become_subreaper()
    t_start = time.perf_counter()
    print(f"shardckpt demo: {cfg.parallel.upper()} on CPU/gloo, {cfg.total_steps} steps of "
          f"{cfg.global_batch} samples, checkpoint every {cfg.save_interval} (async, keep_last=3), "
          f"seed {seed}, in {work}", flush=True)
    try:
        ok = _run(cfg, rng, run_dir, root, ref_root)
    finally:
        for job in _jobs:
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
    st = {n: _read_json(os.path.join(run_dir, f"{n}.start.json")) or {} for n in jobs}
    end = {n: _read_json(os.path.join(run_dir, f"{n}.end.json")) or {} for n in jobs}
    r_c, r_d = st["c"].get("restored"), st["d"].get("restored")
    last_b, last_c = torn["last_step"], _last_step(run_dir, "c")  # as logged by rank 0

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
