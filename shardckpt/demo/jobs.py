"""The demo's ``torchrun`` jobs and what the driver does to them: start one in a
session of its own (``Job``), run it to the end, freeze and SIGKILL it inside an
uncommitted save (``kill_mid_save``), preempt it with SIGTERM (``preempt``), and
reap every process a killed job leaves (``become_subreaper``)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ..errors import IncompleteCheckpointError
from ..format.manifest import MANIFEST_NAME
from ..manager import step_dirname
from .worker import DemoConfig

__all__ = ["Job", "PHASE_TIMEOUT_S", "started", "run_to_end", "kill_mid_save", "preempt", "become_subreaper",
           "last_step", "read_json"]

PHASE_TIMEOUT_S = 180.0
#: every job started, so that none outlives the driver (Ctrl-C included)
started: list[Job] = []


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
        started.append(self)
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


def become_subreaper() -> None:
    # Orphaned workers of a killed agent are then re-parented to this driver, which
    # reaps them at once, instead of to an init that may reap late.
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def last_step(run_dir: str, phase: str) -> int:
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
            info = read_json(os.path.join(markers, name))
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
                    "verify": loadable, "last_step": last_step(job.run_dir, job.phase)}
        time.sleep(0.002)
    raise _fail(job, "never froze mid-save")


def preempt(job: Job, at_step: int) -> None:
    """Once rank 0 finished ``at_step``, SIGTERM torchrun, as a scheduler preempting
    the node does: it forwards the signal to every worker once and waits for them
    (``--shutdown-timeout``); the workers save the step they reached and exit 143."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while last_step(job.run_dir, job.phase) < at_step:
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
