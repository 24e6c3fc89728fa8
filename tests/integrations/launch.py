"""Starting a trainer integration's worker script as real processes: ``torchrun``
with N processes (gloo on CPU) on a free loopback port, in a session of its own
so that a test can SIGKILL every process of the run at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.helpers import REPO_ROOT

__all__ = ["free_port", "torchrun_cmd", "run_workers", "start_workers", "kill_when", "kill_tree", "result_of",
           "torn_checkpoints"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_cmd(nproc: int, script: str | Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", str(script), *args]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def result_of(output: str) -> dict[str, Any]:
    """The ``RESULT {json}`` line rank 0 printed."""
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise AssertionError("the run printed no RESULT line:\n" + output[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


def run_workers(nproc: int, script: str | Path, args: Sequence[str], env: dict[str, str] | None = None,
                timeout: float = 240, expect_ok: bool = True) -> tuple[int, str]:
    """Run to the end; (exit status, stdout+stderr). ``expect_ok``: fail on a nonzero status."""
    proc = subprocess.run(torchrun_cmd(nproc, script, args), cwd=REPO_ROOT, env=_env(env), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.returncode, proc.stdout


def start_workers(nproc: int, script: str | Path, args: Sequence[str], log: Path,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the run in its own session (its process group id is its pid), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(torchrun_cmd(nproc, script, args), cwd=REPO_ROOT, env=_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def torn_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root`` whose save began (``data/``) and has not committed."""
    return [p.parent for p in Path(root).rglob("data") if not (p.parent / "manifest.json").exists()]


def _tree(pid: int) -> list[int]:
    """``pid`` and every process descending from it: torchrun starts its workers in
    sessions of their own, so a signal to the agent's process group misses them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants at once (listed first: none is left to
    notice the others dying and react), like a power cut."""
    for p in _tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, timeout: float = 180) -> None:
    """SIGKILL every process of the run (the agent and all its workers) as soon as ``ready()``."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended ({proc.returncode}) before the kill point:\n"
                                     + log.read_text(errors="replace")[-6000:])
            if time.monotonic() > deadline:
                raise AssertionError("the kill point was never reached:\n" + log.read_text(errors="replace")[-6000:])
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=60)
