"""200 back-to-back async saves on 2 gloo ranks through a CheckpointManager
(``async_save=True, keep_last=2``): memory (RSS), open file descriptors and
threads stay flat after a warm-up, and every kept checkpoint verifies. A leak
per save (a staging buffer, a file left open, a thread or process group per
save) shows up as growth between save 20 and save 200.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import shardckpt
from tests.figures import record
from tests.multiproc import run_multiprocess

SAVES = 200
WARMUP = 20
MAX_GROWTH = 0.05


def _usage() -> dict[str, int]:
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            status[name] = value.split()[0] if value.split() else ""
    return {"rss_kib": int(status["VmRSS"]), "fds": len(os.listdir("/proc/self/fd")), "threads": int(status["Threads"])}


def _state(step: int, rank: int) -> dict[str, torch.Tensor]:
    # 256 KiB per rank: a buffer kept per save would add ~45 MiB by the end, far above 5%
    return {f"r{rank}": torch.full((1 << 16,), float(step)) + rank, "shared": torch.arange(512.0) * step}


def _long_run(rank: int, world: int, root: str, out: str) -> None:
    mgr = shardckpt.CheckpointManager(root, async_save=True, keep_last=2)
    warm: dict[str, int] = {}
    for step in range(1, SAVES + 1):
        mgr.save(step, _state(step, rank))
        if step == WARMUP:
            mgr.wait()  # measured at the same point both times: no save in flight
            warm = _usage()
    mgr.wait()
    end = _usage()
    verified = 0
    if rank == 0:
        kept = mgr.list()
        if [c.step for c in kept] != [SAVES - 1, SAVES] or not all(c.valid for c in kept):
            raise AssertionError(f"kept: {[(c.step, c.status) for c in kept]}")
        for c in kept:
            shardckpt.verify(c.path)
            verified += 1
    every = {**_state(SAVES, 0), **_state(SAVES, 1)}  # a strict load asks for every rank's keys
    state = {k: torch.zeros_like(v) for k, v in every.items()}
    if mgr.restore(state) != SAVES or not all(torch.equal(state[k], v) for k, v in every.items()):
        raise AssertionError("the newest checkpoint does not restore bitwise")
    mgr.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"warm": warm, "end": end, "verified": verified}, f)


@pytest.mark.slow
def test_200_async_saves_keep_memory_fds_and_threads_flat(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run_multiprocess(_long_run, 2, str(tmp_path / "root"), str(out), timeout=170)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    growth = {}
    for r, rep in enumerate(reports):
        w, e = rep["warm"], rep["end"]
        for what in ("rss_kib", "fds", "threads"):
            g = (e[what] - w[what]) / w[what]
            growth[what] = max(growth.get(what, g), g)
            assert g < MAX_GROWTH, f"rank {r}: {what} grew {100 * g:.1f}% from save {WARMUP} to {SAVES}: {w} -> {e}"
    verified = sum(rep["verified"] for rep in reports)
    assert verified == 2
    record("long run", saves=SAVES, ranks=2, rss_growth_pct=round(100 * growth["rss_kib"], 2),
           fd_growth=max(rep["end"]["fds"] - rep["warm"]["fds"] for rep in reports),
           threads_growth=max(rep["end"]["threads"] - rep["warm"]["threads"] for rep in reports), verified=verified)
    print(json.dumps(reports))
