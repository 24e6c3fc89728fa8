#!/usr/bin/env python
"""Export benchmark: a checkpoint saved by 2 ranks -> one safetensors file.

    python benchmarks/bench_convert.py [--gib 2] [--repeats 3] [--warmup 1] [--dir /tmp/x] [--json out.json] [--keep]

State: ``--gib`` GiB of fp32 in 16 DTensors ``[rows, 1024]``, ``Shard(0)`` on a
1-D CPU mesh of 2 gloo ranks (each rank builds only its own shard, seeded), saved
once by ``shardckpt.save`` and once by ``dcp.save(FileSystemWriter(sync_files=True))``
in one ``torchrun`` launch (untimed setup).

Variants, each run in a fresh Python process so its peak RSS (``ru_maxrss``) is
its own:

  shardckpt  ``shardckpt.convert(ckpt, "out.safetensors")``: streams, CRC-checks
             every chunk, fsyncs the output.
  peer       what users do today with a DCP checkpoint:
             ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` ->
             ``torch.load(weights_only=True)`` -> ``safetensors.torch.save_file``,
             then an fsync of the output so both end with a durable file (the
             time before that fsync is reported too).

Runs interleave (``shardckpt, peer, peer, shardckpt, ...``), ``--warmup`` untimed
rounds first; before each run, outside its timing, earlier outputs are deleted and
``sync`` empties the dirty page cache, so no run pays for another's writeback. The
sources stay in the page cache (warm reads for both). Timing is inside each
process, from after imports to the end of its last step. Reported: median wall
time and GB/s (tensor bytes / s, 1 GB = 1e9 B), median peak RSS, and the ratios
peer / shardckpt time (target >= 2x) and shardckpt / peer peak RSS (target <=
0.3x). The last outputs of both are compared tensor by tensor (bitwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._common import child_env, fsync_paths, quiet_warnings, torchrun, write_json  # noqa: E402
from benchmarks._state import COLS, N_TENSORS, make_state, seeded_rows  # noqa: E402
from benchmarks._state import rows_for as _rows_for  # noqa: E402

VARIANTS = ("shardckpt", "peer")
TARGETS = {"speed": 2.0, "rss": 0.3}


def rows_for(gib: float) -> int:
    return _rows_for(gib, 4)


def tensor_bytes(gib: float) -> int:
    return N_TENSORS * rows_for(gib) * COLS * 4


# ---------------------------------------------------------------- setup (torchrun, 2 ranks)


def save_phase(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import shardckpt

    quiet_warnings()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    sd = make_state(mesh, rows_for(args.gib), seeded_rows, prefix="model.")
    t0 = time.perf_counter()
    shardckpt.save(sd, os.path.join(args.dir, "ck"))
    t1 = time.perf_counter()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(os.path.join(args.dir, "dcp"), sync_files=True))
    t2 = time.perf_counter()
    if rank == 0:
        print(f"[setup] saved {tensor_bytes(args.gib) / 2**30:.2f} GiB at {world} ranks: shardckpt "
              f"{t1 - t0:.1f}s, DCP {t2 - t1:.1f}s", file=sys.stderr, flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- one variant run (fresh process)


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def variant_run(args: argparse.Namespace) -> None:
    import warnings

    import safetensors.torch  # noqa: F401 - imported before the baseline, like torch
    import torch  # noqa: F401

    warnings.filterwarnings("ignore")
    out = os.path.join(args.dir, f"out-{args.variant}.safetensors")
    base = _rss_mib()
    res: dict[str, Any] = {"variant": args.variant, "base_rss_mib": base, "steps": {}}
    t0 = time.perf_counter()
    if args.variant == "shardckpt":
        from shardckpt import convert

        convert(os.path.join(args.dir, "ck"), out)
    else:
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        pt = os.path.join(args.dir, "peer-tmp.pt")
        dcp_to_torch_save(os.path.join(args.dir, "dcp"), pt)
        t1 = time.perf_counter()
        sd = torch.load(pt, weights_only=True)
        t2 = time.perf_counter()
        save_file(sd, out)
        t3 = time.perf_counter()
        fsync_paths([out])
        res["steps"] = {"dcp_to_torch_save": t1 - t0, "torch.load": t2 - t1, "save_file": t3 - t2,
                        "fsync": time.perf_counter() - t3}
        res["seconds_unsynced"] = t3 - t0
    res["seconds"] = time.perf_counter() - t0
    res["peak_rss_mib"] = _rss_mib()
    print(json.dumps(res))


def compare_outputs(args: argparse.Namespace) -> None:
    """Both outputs hold the same tensors, bitwise (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

    a, b = (os.path.join(args.dir, f"out-{v}.safetensors") for v in VARIANTS)
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        keys = sorted(fa.keys())
        ok = keys == sorted(fb.keys()) and len(keys) == N_TENSORS
        for k in keys if ok else ():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            ok = ok and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    print(json.dumps({"equal": bool(ok), "keys": len(keys)}))


# ---------------------------------------------------------------- driver


def _child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--gib", repr(args.gib), *extra]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=child_env())
    return json.loads(done.stdout.strip().splitlines()[-1])


def _clean(root: str, variant: str) -> None:
    """Before a run of ``variant``: its previous output and the peer's temporary go,
    and ``sync`` flushes what is dirty, so no run pays for another's writeback."""
    for name in (f"out-{variant}.safetensors", "peer-tmp.pt"):
        if os.path.exists(os.path.join(root, name)):
            os.unlink(os.path.join(root, name))
    os.sync()


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], warm: dict[str, list[float]],
           check: dict[str, Any], setup_s: float, total_s: float) -> dict[str, Any]:
    import torch

    nbytes = tensor_bytes(args.gib)
    med = {v: statistics.median(r["seconds"] for r in runs[v]) for v in VARIANTS}
    rss = {v: statistics.median(r["peak_rss_mib"] for r in runs[v]) for v in VARIANTS}
    base = {v: statistics.median(r["base_rss_mib"] for r in runs[v]) for v in VARIANTS}
    speed, mem = med["peer"] / med["shardckpt"], rss["shardckpt"] / rss["peer"]
    print()
    print(f"export to one safetensors file -- {nbytes / 2**30:.2f} GiB fp32 ({nbytes} B) in {N_TENSORS} "
          f"DTensors [{rows_for(args.gib)}x{COLS}] Shard(0), saved by 2 gloo ranks")
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPU(s); "
          f"{args.warmup} warm-up + {args.repeats} timed runs per variant, interleaved, each a fresh process; "
          "medians; sources warm in the page cache, dirty pages synced before each run")
    print()
    print(f"{'variant':44s} {'median s':>9s} {'GB/s':>6s} {'peak RSS MiB':>13s} {'(base)':>7s}  timed runs (s)")
    print("-" * 100)
    names = {"shardckpt": "shardckpt.convert",
             "peer": "dcp_to_torch_save + torch.load + save_file"}
    for v in VARIANTS:
        print(f"{names[v]:44s} {med[v]:9.2f} {nbytes / med[v] / 1e9:6.2f} {rss[v]:13.0f} {base[v]:7.0f}  "
              + " ".join(f"{r['seconds']:.2f}" for r in runs[v])
              + (f"   (warm-up {' '.join(f'{t:.2f}' for t in warm[v])})" if warm[v] else ""))
    unsynced = statistics.median(r["seconds_unsynced"] for r in runs["peer"])
    steps = {k: statistics.median(r["steps"][k] for r in runs["peer"]) for k in runs["peer"][0]["steps"]}
    print(f"{'  peer before its final fsync':44s} {unsynced:9.2f} {nbytes / unsynced / 1e9:6.2f}   steps: "
          + ", ".join(f"{k} {t:.2f}" for k, t in steps.items()))
    print()
    print(f"outputs equal tensor by tensor: {check['equal']} ({check['keys']} tensors)")
    ok_speed, ok_rss = speed >= TARGETS["speed"], mem <= TARGETS["rss"]
    print(f"  time      peer / shardckpt      {speed:5.2f}x   target >= {TARGETS['speed']:.1f}x  "
          f"{'MET' if ok_speed else 'MISSED'}  (vs peer before fsync: {unsynced / med['shardckpt']:.2f}x)")
    print(f"  peak RSS  shardckpt / peer      {mem:5.2f}x   target <= {TARGETS['rss']:.1f}x  "
          f"{'MET' if ok_rss else 'MISSED'}  (above the {base['shardckpt']:.0f} MiB import baseline: "
          f"{rss['shardckpt'] - base['shardckpt']:.0f} vs {rss['peer'] - base['peer']:.0f} MiB)")
    print()
    print(f"total wall time {total_s:.0f}s (setup {setup_s:.0f}s)")
    return {"gib": args.gib, "tensor_bytes": nbytes, "runs": runs, "warmup_seconds": warm, "median_s": med,
            "median_peak_rss_mib": rss, "speed_ratio": speed, "rss_ratio": mem, "peer_unsynced_s": unsynced,
            "peer_steps_s": steps, "outputs_equal": check["equal"], "targets": TARGETS,
            "met": {"speed": ok_speed, "rss": ok_rss}, "total_s": total_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="total fp32 state in GiB (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (>= 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per variant")
    ap.add_argument("--dir", default=None, help="parent directory for the scratch directory")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--phase", choices=("save",), help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "save":
        return save_phase(args)
    if args.variant:
        return variant_run(args)
    if args.compare:
        return compare_outputs(args)
    if args.repeats < 3 or args.warmup < 0 or args.gib <= 0:
        ap.error("--repeats >= 3, --warmup >= 0, --gib > 0")

    t_start = time.perf_counter()
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="shardckpt-bench-convert-", dir=args.dir)
    scratch = argparse.Namespace(**{**vars(args), "dir": root})
    print(f"benchmark directory: {root}", file=sys.stderr, flush=True)
    try:
        torchrun(__file__, 2, ["--phase", "save", "--gib", repr(args.gib), "--dir", root], omp_threads=1)
        os.sync()
        setup_s = time.perf_counter() - t_start
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        warm: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(args.warmup + args.repeats):
            for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                _clean(root, v)
                res = _child(scratch, "--variant", v)
                (warm[v].append(res["seconds"]) if i < args.warmup else runs[v].append(res))
                print(f"[{'warm-up' if i < args.warmup else 'run'} {i}] {v:9s} {res['seconds']:.2f}s "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        check = _child(scratch, "--compare")
        results = report(args, runs, warm, check, setup_s, time.perf_counter() - t_start)
        write_json(results, args.json, indent=2)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if check["equal"] else 1)


if __name__ == "__main__":
    main()
