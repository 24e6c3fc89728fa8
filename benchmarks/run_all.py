"""One command for every benchmark: ``python -m benchmarks [--quick]``.

Runs the benchmark scripts of this folder, each as a subprocess with ``--json``
(one script, one process: every script already launches its own ``torchrun``
jobs, and a crash or a hang in one must not take the others with it), merges
what they wrote into one results file, ``docs/benchmarks/results.json``, with
the machine it ran on, then draws the plots (``benchmarks/plots.py``) next to it.

Call order:

1. parse the arguments (:func:`parse_args`); ``--only`` / ``--skip`` pick steps.
2. for each picked step (:data:`STEPS`, then any ``bench_*.py`` not listed, in
   full mode): check that its script and the flags it needs exist, run it with a
   timeout, read its JSON (or keep its output's tail when it has no ``--json``).
   A step that is missing, fails or times out is recorded as such; the others go on.
3. merge into the existing results file (:func:`merge_results`): steps run now
   replace their earlier entries, the others are kept (each entry carries its own
   machine and date, so a plot always says where its numbers come from).
4. write the results file, then the plots (``--no-plots`` skips them;
   ``--plots-only`` redraws from an existing results file without running anything).

Modes: ``--quick`` (about 4 minutes on a 2-core VM: small states, the minimum of
repetitions each script accepts, only the plotted benchmarks and CRC32C) and the
default full mode (0.25-4 GiB states, more repetitions, every benchmark including
S3, many-ranks, export and replicas; an hour or more). Every script keeps its own
method: contenders interleaved A B A B ..., medians, ratios from one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import child_env, machine_info, package_version  # noqa: E402

__all__ = [
    "RESULTS_SCHEMA",
    "STEPS",
    "Step",
    "core_libs",
    "machine_info",
    "main",
    "merge_results",
    "parse_args",
    "parse_sizes",
    "run_step",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = REPO / "docs" / "benchmarks"
RESULTS_NAME = "results.json"
RESULTS_SCHEMA = 1
QUICK_SIZES = (0.25, 0.5)
FULL_SIZES = (0.25, 0.5, 1.0, 2.0, 4.0)
# Scripts that are not benchmarks of the engine (they write other documents).
NOT_BENCHMARKS = frozenset({"reliability_report.py", "run_all.py", "plots.py"})
TAIL_CHARS = 4000  # of a step's output kept in the results (JSON-less steps, failures)


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One benchmark script and how the suite calls it.

    ``args(mode, sizes, json_path)`` returns its command-line arguments;
    ``needs`` are flags its ``--help`` must show (a script another engineer is
    still extending is then reported as not ready instead of failing on an
    unknown flag); ``plotted`` marks the steps quick mode runs.
    """

    name: str
    script: str
    args: Callable[[str, tuple[float, ...], str], list[str]]
    needs: tuple[str, ...] = ("--json",)
    plotted: bool = False
    quick: bool = False
    timeout_s: dict[str, float] = field(default_factory=lambda: {"quick": 300, "full": 3600})


def _sizes_arg(sizes: tuple[float, ...]) -> str:
    return ",".join(f"{s:g}" for s in sizes)


def _async_args(mode: str, sizes: tuple[float, ...], out: str) -> list[str]:
    args = ["--sizes", _sizes_arg(sizes), "--json", out]
    if mode == "quick" and "--copy-repeats" in (HERE / "bench_async.py").read_text():
        # Its copy-floor phase alone (the stall and training phases take minutes), 4 rounds.
        args += ["--phases", "C", "--copy-repeats", "4"]
    return args


def _codec_args(mode: str, sizes: tuple[float, ...], out: str) -> list[str]:
    if mode == "quick":  # the plotted data sets only: no Adam training, no disk probe
        return ["--repeats", "3", "--sets", "minilm-fp32,minilm-bf16,minilm-fp16",
                "--disk-dir", "", "--json", out]  # fmt: skip
    return ["--repeats", "5", "--json", out]


def _scale_args(mode: str, sizes: tuple[float, ...], out: str) -> list[str]:
    if mode == "quick":  # one repetition: DCP's planning alone takes ~35 s at 512 ranks here
        return ["--ranks", "8,64,512", "--repeats", "1", "--json", out]
    return ["--ranks", "8,64,512,1024,4096,8192", "--json", out]


def _crc_args(mode: str, sizes: tuple[float, ...], out: str) -> list[str]:
    if mode == "quick":
        return ["--size-mib", "32", "--repeats", "5", "--json", out]
    return ["--json", out]


def _json_only(mode: str, sizes: tuple[float, ...], out: str) -> list[str]:
    return ["--json", out]


def _no_args(mode: str, sizes: tuple[float, ...], out: str) -> list[str]:
    return []


# ``core`` is special-cased (one run per state size), see _run_core.
STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step("core", "bench_core.py", _json_only, needs=("--json", "--libs"), plotted=True,
             quick=True),
        Step("async", "bench_async.py", _async_args, needs=("--json", "--sizes"), plotted=True,
             quick=True),
        Step("codec", "bench_codec.py", _codec_args, plotted=True, quick=True),
        Step("scale", "bench_scale.py", _scale_args, needs=("--json", "--ranks"), plotted=True,
             quick=True),
        Step("crc", "bench_crc.py", _crc_args, quick=True),
        Step("many", "bench_many.py", _json_only),
        Step("convert", "bench_convert.py", _json_only),
        Step("s3", "bench_s3.py", _json_only),
        Step("replicas", "bench_replicas.py", _no_args, needs=()),
        Step("tiers", "bench_tiers.py", _json_only),
        Step("shared_reads", "bench_shared_reads.py", _json_only),
        Step("integrations", "bench_integrations.py", _json_only),
    )
}  # fmt: skip


def _discovered_steps() -> list[Step]:
    """``bench_*.py`` files nobody registered yet: run plainly (full mode), output kept."""
    known = {s.script for s in STEPS.values()} | NOT_BENCHMARKS
    out = []
    for p in sorted(HERE.glob("bench_*.py")):
        if p.name not in known:
            out.append(Step(p.stem.removeprefix("bench_"), p.name, _no_args, needs=()))
    return out


def core_libs() -> tuple[list[str], dict[str, Any]]:
    """The libraries of the throughput benchmark, and a note on Meta's torch_checkpointing."""
    libs = ["shardckpt", "dcp", "torch-save"]
    note: dict[str, Any] = {"package": "torch_checkpointing (PyPI)"}
    if importlib.util.find_spec("torch_checkpointing") is None:
        note.update(available=False, reason="not installed (pip install torch_checkpointing)")
    else:
        libs.append("torch-ckpt")
        note.update(
            available=True,
            version=package_version("torch_checkpointing"),
            config="CheckpointManager, SyncCheckpointSaverConfig, DefaultResharder, "
            "LocalFileSystemStorageConfig(use_direct_io=False)",
            why_no_direct_io="its O_DIRECT path fails on some filesystems; run buffered",
            workarounds=[
                "metadata all-gather hard-codes device='cuda': the same gather on CPU",
                "sync saver writes resharding metadata only on the first save: cache off",
                "never fsyncs: each rank fsyncs its files inside the timed region",
            ],
        )
    return libs, note


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def _help_text(script: Path) -> str:
    try:
        done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                              text=True, timeout=120, cwd=REPO)  # fmt: skip
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout + done.stderr


def _tail(text: str) -> str:
    return text[-TAIL_CHARS:]


def _run(cmd: list[str], timeout_s: float, log: Any) -> tuple[int | None, str, float]:
    """Run ``cmd`` with its output appended to ``log``; (exit status or None on timeout, tail, s)."""
    env = child_env()
    env.setdefault("MPLBACKEND", "Agg")
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    t0 = time.perf_counter()
    # start_new_session: a timeout kills the script's torchrun workers too, not just the script
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        rc: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        rc = None
    wall = time.perf_counter() - t0
    log.flush()
    with open(log.name, errors="replace") as f:
        f.seek(max(start, os.path.getsize(log.name) - TAIL_CHARS))
        tail = f.read()
    return rc, _tail(tail), wall


def _entry(step: Step, mode: str, **kw: Any) -> dict[str, Any]:
    return {"script": f"benchmarks/{step.script}", "mode": mode, "machine": machine_info(), **kw}


def _run_core(step: Step, mode: str, sizes: tuple[float, ...], tmp: str, log: Any,
              timeout_s: float) -> dict[str, Any]:  # fmt: skip
    """bench_core once per state size, all libraries interleaved in each run."""
    libs, tc_note = core_libs()
    extra = ["--repeats", "3", "--warmup", "1", "--phases", "AB"] if mode == "quick" else [
        "--repeats", "5", "--warmup", "1", "--phases", "ABC"]  # fmt: skip
    per_size: list[dict[str, Any]] = []
    problems: list[str] = []
    t0 = time.perf_counter()
    for gib in sizes:
        out = os.path.join(tmp, f"core-{gib:g}.json")
        cmd = [sys.executable, str(HERE / step.script), "--gib", f"{gib:g}",
               "--libs", ",".join(libs), "--json", out, *extra]  # fmt: skip
        rc, tail, _ = _run(cmd, timeout_s, log)
        if rc not in (0, None) and "torch-ckpt" in libs:
            # One peer failing must not cost the plot the others: rerun without it, say why.
            tc_note.update(available=False, reason=f"failed in this run (exit {rc}): "
                           + tail[-600:].strip())  # fmt: skip
            libs = [x for x in libs if x != "torch-ckpt"]
            cmd[cmd.index("--libs") + 1] = ",".join(libs)
            rc, tail, _ = _run(cmd, timeout_s, log)
        if rc != 0 or not os.path.exists(out):
            problems.append(f"{gib:g} GiB: exit {rc}; {tail[-800:].strip()}")
            continue
        with open(out) as f:
            per_size.append(json.load(f))
    status = "ok" if per_size and not problems else ("partial" if per_size else "failed")
    return _entry(step, mode, status=status, wall_s=time.perf_counter() - t0,
                  data={"sizes": per_size, "libs": libs, "torch_checkpointing": tc_note},
                  problems=problems)  # fmt: skip


def run_step(step: Step, mode: str, sizes: tuple[float, ...], tmp: str, log: Any) -> dict[str, Any]:
    """Run one step; always returns an entry (status ok / partial / failed / missing / ...)."""
    script = HERE / step.script
    timeout_s = step.timeout_s[mode]
    if not script.exists():
        return _entry(step, mode, status="missing",
                      message=f"benchmarks/{step.script} does not exist (yet); step skipped")  # fmt: skip
    if step.needs:
        helptext = _help_text(script)
        lacking = [flag for flag in step.needs if flag not in helptext]
        if lacking:
            return _entry(step, mode, status="not-ready",
                          message=f"benchmarks/{step.script} has no {', '.join(lacking)} "
                          "(yet); step skipped")  # fmt: skip
    if step.name == "core":
        return _run_core(step, mode, sizes, tmp, log, timeout_s)
    out = os.path.join(tmp, f"{step.name}.json")
    cmd = [sys.executable, str(script), *step.args(mode, sizes, out)]
    rc, tail, wall = _run(cmd, timeout_s, log)
    entry = _entry(step, mode, wall_s=wall, cmd=["python", f"benchmarks/{step.script}",
                                                 *[a for a in cmd[2:] if a != out]])  # fmt: skip
    if rc is None:
        entry.update(status="timeout", message=f"killed after {timeout_s:.0f} s", output_tail=tail)
    elif "--json" in cmd and os.path.exists(out):
        with open(out) as f:
            entry.update(status="ok" if rc == 0 else "failed", data=json.load(f))
        if rc != 0:
            entry["output_tail"] = tail
    elif rc == 0 and "--json" not in cmd:
        entry.update(status="ok", output_tail=tail)  # a script without --json: its report text
    else:
        entry.update(status="failed", message=f"exit {rc}", output_tail=tail)
    return entry


# ---------------------------------------------------------------------------
# Arguments and results
# ---------------------------------------------------------------------------


def parse_sizes(text: str) -> tuple[float, ...]:
    """``"0.25,0.5"`` -> (0.25, 0.5); every size a positive number of GiB."""
    try:
        sizes = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"sizes: {e}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("sizes: one or more positive GiB values, e.g. 0.25,0.5")
    return sizes


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in STEPS and n not in {s.name for s in _discovered_steps()}]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown step(s) {unknown}; known: {', '.join(sorted(STEPS))}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The suite's command line; ``.mode`` is "quick" or "full", ``.sizes`` GiB per state."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small states, fewest repeats, plotted benchmarks only (~4 min)")  # fmt: skip
    ap.add_argument("--only", type=_names, default=None, help="comma-separated steps to run")
    ap.add_argument("--skip", type=_names, default=[], help="comma-separated steps not to run")
    ap.add_argument("--sizes", type=parse_sizes, default=None,
                    help="state sizes in GiB for core and async (default: quick 0.25,0.5; "
                    "full 0.25,0.5,1,2,4)")  # fmt: skip
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                    help="where results.json and the PNGs go (default docs/benchmarks)")  # fmt: skip
    ap.add_argument("--fresh", action="store_true",
                    help="do not keep entries of steps not run now from an earlier results.json")  # fmt: skip
    ap.add_argument("--no-plots", action="store_true", help="write results.json only")
    ap.add_argument("--plots-only", action="store_true",
                    help="run nothing; redraw the plots from the existing results.json")  # fmt: skip
    ap.add_argument("--log", default=None,
                    help="file for the scripts' output (default $TMPDIR/shardckpt-suite.log)")  # fmt: skip
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    args = ap.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.plots_only and args.no_plots:
        ap.error("--plots-only and --no-plots contradict each other")
    return args


def selected_steps(args: argparse.Namespace) -> list[Step]:
    """Steps to run: --only, else quick's (the plotted ones and crc) or all; minus --skip."""
    every = list(STEPS.values()) + _discovered_steps()
    if args.only:
        steps = [s for s in every if s.name in args.only]
    elif args.mode == "quick":
        steps = [s for s in every if s.quick]
    else:
        steps = every
    return [s for s in steps if s.name not in args.skip]


def merge_results(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s entries replace ``old``'s of the same name; the rest of ``old`` stays.

    An entry that ``new`` has only as not run (missing / not-ready) does not
    overwrite an earlier measured one: the earlier numbers are kept, marked with
    what the latest attempt said. Top-level machine, date and mode are ``new``'s.
    """
    merged = dict(new)
    benches: dict[str, Any] = {}
    if old and old.get("schema") == RESULTS_SCHEMA:
        benches.update(old.get("benchmarks", {}))
    for name, entry in new.get("benchmarks", {}).items():
        prev = benches.get(name)
        if entry.get("status") in ("missing", "not-ready") and prev and "data" in prev:
            benches[name] = {**prev, "latest_attempt": entry.get("message", entry["status"])}
        else:
            benches[name] = entry
    merged["benchmarks"] = benches
    return merged


def _load(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit status 0 if every run step is ok (missing steps do not count)."""
    args = parse_args(argv)
    results_path = args.out_dir / RESULTS_NAME
    if args.list:
        for s in list(STEPS.values()) + _discovered_steps():
            tags = ",".join(t for t, on in (("quick", s.quick), ("plotted", s.plotted)) if on)
            print(f"{s.name:14s} benchmarks/{s.script:24s} {tags}")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ok = True
    if not args.plots_only:
        t0 = time.perf_counter()
        new: dict[str, Any] = {
            "schema": RESULTS_SCHEMA,
            "mode": args.mode,
            "sizes_gib": list(args.sizes),
            "machine": machine_info(),
            "benchmarks": {},
            "note": "ratios carry over; absolute numbers are this machine's",
        }
        log_path = args.log or os.path.join(tempfile.gettempdir(), "shardckpt-suite.log")
        print(f"every script's output goes to {log_path}", flush=True)
        with tempfile.TemporaryDirectory(prefix="shardckpt-suite-") as tmp:
            with open(log_path, "w") as log:
                for step in selected_steps(args):
                    print(f"== {step.name}: benchmarks/{step.script} ({args.mode})", flush=True)
                    entry = run_step(step, args.mode, tuple(args.sizes), tmp, log)
                    new["benchmarks"][step.name] = entry
                    wall = entry.get("wall_s")
                    print(f"== {step.name}: {entry['status']}"
                          + (f" in {wall:.0f} s" if wall else "")
                          + (f" -- {entry['message']}" if entry.get("message") else ""),
                          flush=True)  # fmt: skip
                    ok = ok and entry["status"] in ("ok", "missing", "not-ready")
        new["wall_s"] = time.perf_counter() - t0
        merged = new if args.fresh else merge_results(_load(results_path), new)
        results_path.write_text(json.dumps(merged, indent=1, sort_keys=False) + "\n")
        print(f"results: {results_path} ({new['wall_s']:.0f} s)")
    if not args.no_plots:
        from benchmarks import plots  # lazy: matplotlib is only needed for this part

        results = _load(results_path)
        if results is None:
            print(f"no results at {results_path}; run the suite first", file=sys.stderr)
            return 2
        for name, msg in plots.plot_all(results, args.out_dir).items():
            print(f"plot {name}: {msg}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
