"""Run a real multi-node torchrun job on one machine: N elastic agents on loopback.

Each "node" is its own ``python -m torch.distributed.run`` agent (a separate
process, in a session of its own) joined by the c10d rendezvous, so the code
under test sees what a real multi-node job sees: ``GROUP_RANK``/``LOCAL_RANK``
differ from ``RANK``, MASTER_ADDR is picked by the rank-0 agent, and each agent
restarts/stops only its own workers. With ``private_tmpfs=DIR`` each agent runs
in its own mount namespace with a private tmpfs at DIR, so DIR is node-local
storage: every node sees only the files written on it.

Why the rendezvous store lives in this (the test) process: with the default
``is_host`` heuristic every agent on loopback "matches" the endpoint, the first
one to bind hosts the store, and its exit can pull the store from under the
other agents' shutdown. Here the store is created before the agents (port 0:
a free port, held, so parallel tests never collide) and outlives all of them;
every agent gets ``--rdzv-conf=is_host=false``.

Why the kill walks the process tree: torchrun starts every worker in a session
of its own, so killing an agent's process group does not reach its workers.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import REPO_ROOT

__all__ = ["AgentResult", "JobResult", "MultinodeTimeout", "can_mount_private_tmpfs", "run_multinode"]

TMPFS_SIZE = "256m"


@dataclass
class AgentResult:
    """One agent ("node"): its exit code and what it and its workers printed."""

    node: int
    returncode: int
    stdout: str
    stderr: str


@dataclass
class JobResult:
    agents: list[AgentResult]
    wall_s: float
    cmd: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(a.returncode == 0 for a in self.agents)

    def logs(self, tail: int = 60) -> str:
        return "\n".join(_format_tail(a.node, a.returncode, a.stdout, a.stderr, tail) for a in self.agents)

    def check(self) -> JobResult:
        """Raise AssertionError with every agent's log tail unless all exited 0."""
        if not self.ok:
            codes = [a.returncode for a in self.agents]
            raise AssertionError(f"agent exit codes {codes} (cmd: {shlex.join(self.cmd)})\n{self.logs()}")
        return self


class MultinodeTimeout(TimeoutError):
    """The job did not finish in time; every agent and worker has been killed."""


def _format_tail(node: int, rc: int | None, out: str, err: str, tail: int) -> str:
    def last(s: str) -> str:
        return "\n".join(s.splitlines()[-tail:])

    return f"--- node {node} (exit {rc}) stdout ---\n{last(out)}\n--- node {node} stderr ---\n{last(err)}"


def _mount_prefix(directory: str) -> list[str]:
    """Run the rest in a private mount namespace with a fresh tmpfs at ``directory``.

    ``unshare`` without ``--fork`` execs in place (and ``sh`` execs python), so
    the agent keeps the pid ``Popen`` returned; ``--propagation private`` keeps
    the mount from leaking into the parent namespace (and the other agents').
    """
    d = shlex.quote(directory)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f"mkdir -p {d} && mount -t tmpfs -o size={TMPFS_SIZE} tmpfs {d} && exec \"$@\"", "sh"]


@functools.cache
def can_mount_private_tmpfs() -> bool:
    """Whether ``private_tmpfs`` works here (root or CAP_SYS_ADMIN, unshare present),
    and really is private: a file written inside must not show up outside."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    with tempfile.TemporaryDirectory(prefix="multinode-probe-") as tmp:
        d = os.path.join(tmp, "local")
        try:
            out = subprocess.run([*_mount_prefix(d), "sh", "-c", f"touch {shlex.quote(d)}/probe"],
                                 capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.returncode == 0 and not os.path.exists(os.path.join(d, "probe"))


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid``'s process group and every descendant's (each worker leads a session)."""
    victims = _descendants(pid)
    for p in [pid, *victims]:
        for kill in (os.killpg, os.kill):
            try:
                kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return victims


def _wait_gone(pids: Sequence[int], timeout: float = 10.0) -> None:
    """Wait until orphaned workers are gone (or zombies that init will reap)."""
    deadline = time.monotonic() + timeout
    for p in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.05)


def run_multinode(
    worker_args: Sequence[str],
    *,
    nnodes: int,
    nproc_per_node: int,
    log_dir: str | os.PathLike[str],
    module: str | None = "tests.multinode.multinode_worker",
    script: str | None = None,
    private_tmpfs: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 90.0,
    monitor_interval: float = 0.5,
) -> JobResult:
    """Run ``nnodes`` torchrun agents x ``nproc_per_node`` workers; wait for all of them.

    The workers run ``python -m module *worker_args`` (or ``script`` if given).
    Each agent's stdout/stderr go to files in ``log_dir`` (pipes could fill and
    stall a chatty job). Returns every agent's exit code and output, whatever
    they are (``.check()`` asserts success). On ``timeout`` every agent and
    worker is killed and ``MultinodeTimeout`` raised with the log tails.
    """
    import torch.distributed as dist

    if private_tmpfs is not None and not can_mount_private_tmpfs():
        raise RuntimeError("private_tmpfs needs mount namespaces (see can_mount_private_tmpfs())")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"multinode-{uuid.uuid4().hex[:12]}"
    # The rendezvous store: see the module docstring. Held until every agent is gone.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    if script is None and module is None:
        raise ValueError("give module or script")
    target = ["-m", module] if script is None else [script]
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{store.port}", f"--rdzv-id={run_id}",
        "--rdzv-conf=is_host=false",
        # the rank-0 node's address becomes every worker's MASTER_ADDR; the default
        # (socket.getfqdn()) need not resolve to an address reachable here
        "--local-addr=127.0.0.1",
        "--max-restarts=0", f"--monitor-interval={monitor_interval}",
        *target, *worker_args,
    ]
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": pythonpath,
        "PYTHONUNBUFFERED": "1",
        # gloo picks its interface from the hostname's address unless told; pin it to
        # loopback so a hostname resolving to an external address cannot matter
        "GLOO_SOCKET_IFNAME": "lo",
        **(env or {}),
    }
    prefix = _mount_prefix(private_tmpfs) if private_tmpfs is not None else []
    procs: list[subprocess.Popen[bytes]] = []
    files = []
    t0 = time.monotonic()
    try:
        for node in range(nnodes):
            out = open(log_dir / f"{run_id}.node{node}.out", "wb")
            err = open(log_dir / f"{run_id}.node{node}.err", "wb")
            files.append((out, err))
            procs.append(subprocess.Popen([*prefix, *cmd], stdout=out, stderr=err, env=full_env,
                                          cwd=str(REPO_ROOT), start_new_session=True))
        deadline = t0 + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        timed_out = any(p.poll() is None for p in procs)
    finally:
        orphans = [v for p in procs if p.poll() is None for v in _kill_tree(p.pid)]
        for p in procs:
            p.wait()
        _wait_gone(orphans)
        for out, err in files:
            out.close()
            err.close()
        del store  # only now: no agent is left to talk to it
    wall = time.monotonic() - t0

    def read(node: int, ext: str) -> str:
        return (log_dir / f"{run_id}.node{node}.{ext}").read_text(errors="replace")

    agents = [AgentResult(n, p.returncode, read(n, "out"), read(n, "err")) for n, p in enumerate(procs)]
    result = JobResult(agents, wall, [*prefix, *cmd])
    if timed_out:
        raise MultinodeTimeout(f"{nnodes}x{nproc_per_node} job did not finish in {timeout:.0f}s; killed\n"
                               f"{result.logs()}")
    return result
