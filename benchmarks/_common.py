"""What the benchmark scripts share, kept once: launching, timing, statistics, output.

Driver side (the process a user starts):

* :data:`REPO`, :func:`child_env`: children import the checkout this file lives in.
* :func:`torchrun`: ``python -m torch.distributed.run --standalone`` on this machine,
  rank chatter on stderr so stdout carries only the report.
* :func:`run_phases`: the phase loop of ``bench_core.py`` and ``bench_async.py``: a
  scratch directory, one torchrun launch per phase that writes its JSON there, the
  JSON read back with the launch's wall time; a failed phase exits 2.
* :func:`write_json`, :func:`cpu_model`, :func:`machine`, :func:`machine_info`,
  :func:`package_version`: what the numbers were measured on and where they go.

Rank side (inside a torchrun worker; torch is imported only when called):

* :func:`quiet_warnings`, :func:`rank0_logger`: less noise, progress from rank 0.
* :func:`barrier_timed`: barrier, clock, call, barrier, clock -- the timing every
  collective benchmark uses (a collective call is done when the slowest rank is).
* :func:`all_ranks`: a flag that holds only if it holds on every rank.
* :func:`rank0_clear`: once every rank is done with them, rank 0 deletes checkpoints
  and flushes dirty pages, so the next timed call does not pay for this one's writeback.
* :func:`finish_ranks`: rank 0 writes the worker's JSON, every rank leaves the group.
* :func:`fsync_paths`: make files (and directories) durable.

Statistics: :func:`med` (median, NaN when empty), :func:`rotated` (the order of
interleaved contenders in round ``k``), :func:`verdict`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar

__all__ = [
    "REPO",
    "all_ranks",
    "barrier_timed",
    "child_env",
    "cpu_model",
    "finish_ranks",
    "fsync_paths",
    "machine",
    "machine_info",
    "med",
    "omp_per_rank",
    "package_version",
    "quiet_warnings",
    "rank0_clear",
    "rank0_logger",
    "rotated",
    "run_phases",
    "torchrun",
    "verdict",
    "write_json",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = TypeVar("T")


# ---------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------


def child_env(omp_threads: int | None = None) -> dict[str, str]:
    """This process's environment, with the checkout first on PYTHONPATH (and OMP threads set)."""
    env = dict(os.environ)
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def omp_per_rank(nproc: int) -> int:
    """The machine's cores shared out between ``nproc`` ranks (at least one each)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def torchrun(script: str, nproc: int, args: Sequence[str], *, omp_threads: int | None = None,
             check: bool = True, stdout: IO[str] | None = sys.stderr) -> int:  # fmt: skip
    """Run ``script args`` on ``nproc`` local ranks; return torchrun's exit status.

    ``omp_threads`` defaults to :func:`omp_per_rank`; ``check`` raises
    ``subprocess.CalledProcessError`` on failure; ``stdout=None`` leaves the
    ranks' output on this process's stdout.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), os.path.abspath(script), *args]  # fmt: skip
    env = child_env(omp_per_rank(nproc) if omp_threads is None else omp_threads)
    return subprocess.run(cmd, check=check, stdout=stdout, env=env).returncode


def run_phases(script: str, phases: str, nproc: Callable[[str], int],
               phase_args: Callable[[str, str, str], list[str]], *, parent: str | None,
               keep: bool, prefix: str) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Launch ``script --phase P <phase_args(P, root, out)>`` under torchrun for each phase.

    ``root`` is a fresh scratch directory under ``parent`` (kept with ``keep``),
    ``out`` the JSON file the phase's rank 0 writes; each phase's JSON is returned
    with ``wall_s``, its launch included. A failing phase exits 2.
    """
    if parent:
        os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix=prefix, dir=parent)
    print(f"benchmark directory: {root}", file=sys.stderr, flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        for phase in phases:
            out = os.path.join(root, f"result-{phase}.json")
            t0 = time.perf_counter()
            try:
                torchrun(script, nproc(phase), ["--phase", phase, *phase_args(phase, root, out)])
            except subprocess.CalledProcessError as e:
                print(f"phase {phase} failed (torchrun exit status {e.returncode}); see its output above",
                      file=sys.stderr)  # fmt: skip
                sys.exit(2)
            with open(out) as f:
                results[phase] = json.load(f)
            results[phase]["wall_s"] = time.perf_counter() - t0
    finally:
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return results


def write_json(result: Any, path: str | None, *, indent: int = 1,
               announce: IO[str] | None = None) -> None:  # fmt: skip
    """Write ``result`` to ``path`` (nothing if no path); say so on ``announce`` if given."""
    if not path:
        return
    with open(path, "w") as f:
        json.dump(result, f, indent=indent)
    if announce is not None:
        print(f"results written to {path}", file=announce)


# ---------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------


def _proc_field(path: str, prefix: str) -> str | None:
    """The text after ``:`` on the first line of ``path`` starting with ``prefix``."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model(default: str | None = None) -> str:
    """The CPU model from /proc/cpuinfo; else ``default``, else what platform says."""
    found = _proc_field("/proc/cpuinfo", "model name")
    if found is not None:
        return found
    return default if default is not None else (platform.processor() or platform.machine())


def _cpu_flags() -> list[str]:
    """The CPU features our kernels dispatch on (the speed of CRC and codec depends on them)."""
    want = ("avx2", "avx512f", "avx512vbmi", "vpclmulqdq", "pclmulqdq", "sse4_2")
    have = set((_proc_field("/proc/cpuinfo", "flags") or "").split())
    return [x for x in want if x in have]


def _ram_gib() -> float | None:
    total = _proc_field("/proc/meminfo", "MemTotal:")
    return round(int(total.split()[0]) / (1 << 20), 1) if total else None


def package_version(module: str) -> str | None:
    """The installed version of ``module``'s distribution, None if absent."""
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or no metadata: report as absent
        return None


def machine_info() -> dict[str, Any]:
    """What the suite's numbers were measured on: CPU model, cores, RAM, versions, date (UTC)."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "torch": torch_version,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "torch_checkpointing": package_version("torch_checkpointing"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def machine() -> dict[str, Any]:
    """The S3-backed scripts' machine record: CPU, usable and total CPUs, local date, platform."""
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(platform.processor() or "unknown"), "nproc": aff,
            "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "platform": platform.platform()}  # fmt: skip


# ---------------------------------------------------------------------------
# Rank side (under torchrun)
# ---------------------------------------------------------------------------


def quiet_warnings(pinned_memory: bool = False) -> None:
    """Silence torch's deprecation and DCP chatter in the ranks.

    The pinned-memory warning filter is only for ``pinned_memory`` callers
    (bench_async, as before the harness was shared): the other scripts measure the
    peers with the warning filters they always had, so their ratios stay comparable
    with earlier runs."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed.checkpoint")
    if pinned_memory:
        warnings.filterwarnings("ignore", message=".*[Pp]in.*memory.*")


def rank0_logger(tag: str) -> Callable[[str], None]:
    """``log(msg)``: ``[tag] msg`` on stderr from rank 0 only (the process group must exist)."""
    import torch.distributed as dist

    rank = dist.get_rank()

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return log


def barrier_timed(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds from a barrier before ``fn(*args)`` to a barrier after it."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn(*args)
    dist.barrier()
    return time.perf_counter() - t0


def all_ranks(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (a MIN all-reduce)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def rank0_clear(*paths: str) -> None:
    """After a barrier, rank 0 removes ``paths`` (directories) and runs ``sync``."""
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        os.sync()


def finish_ranks(result: Any, out: str | None) -> None:
    """End a worker: rank 0 writes ``result`` as JSON to ``out``; all ranks meet and leave the group."""
    import torch.distributed as dist

    if dist.get_rank() == 0 and out:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def fsync_paths(paths: Sequence[str]) -> None:
    """fsync each file or directory in ``paths``."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def med(xs: Sequence[float]) -> float:
    """The median; NaN for no values (a contender that never ran)."""
    return statistics.median(xs) if xs else float("nan")


def rotated(items: Sequence[T], k: int) -> list[T]:
    """``items`` started at position ``k`` (mod len): round ``k``'s order of interleaved contenders."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"
