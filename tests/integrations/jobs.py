"""Starting trainer jobs the way users do (``torchrun``), and killing them while a
checkpoint is being written, for the integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.helpers import REPO_ROOT

__all__ = ["torchrun", "run_job", "kill_when", "torn_checkpoints"]


def torchrun(script: str | Path, args: Sequence[str], nproc: int) -> list[str]:
    """The command line of ``torchrun --standalone`` (a free port: parallel tests never collide)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(script), *args]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_job(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end; its output is returned (not checked: tests assert on it)."""
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)


def torn_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root`` whose save began (``data/``) and has not committed."""
    return [p.parent for p in Path(root).rglob("data") if not (p.parent / "manifest.json").exists()]


def _tree(pid: int) -> list[int]:
    """``pid`` and every process descending from it (torchrun starts its workers in
    sessions of their own, so a process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_all(pid: int) -> None:
    for p in _tree(pid):  # listed first, then killed together: no one is left to respawn
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_when(cmd: Sequence[str], ready: Callable[[], bool], env: dict[str, str] | None = None,
              timeout: float = 240) -> str:
    """Start ``cmd``, SIGKILL every process of it (the agent and all its ranks at
    once, like a power cut) as soon as ``ready()`` holds; its output."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"the job ended (rc={proc.returncode}) before the moment to kill it:\n"
                                     + (proc.stdout.read() if proc.stdout else ""))
            if time.monotonic() > deadline:
                raise AssertionError("the moment to kill the job never came")
            time.sleep(0.02)
        _kill_all(proc.pid)
        out, _ = proc.communicate(timeout=60)
        return out
    finally:
        if proc.poll() is None:
            _kill_all(proc.pid)
            proc.wait()
