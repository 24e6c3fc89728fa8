"""shardckpt.mmengine with the real MMEngine package, in real processes (torchrun, gloo on
CPU): equivalence with MMEngine's own ``.pth`` checkpoints, SIGKILL during a save then
``resume=True``, 2 -> 1 and 3 processes, bad input, ``shardckpt convert`` of a ``.pth``,
the example script. Every run is ``_mmengine_worker.py`` (a tiny MLP, 8 iterations, a
checkpoint every 4, AdamW + MultiStepLR + EMAHook).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, state_diff
from tests.integrations.launch import kill_tree, torchrun_cmd, torn_checkpoints

pytest.importorskip("mmengine")

WORKER = Path(__file__).with_name("_mmengine_worker.py")
#: What a resumed run must reproduce exactly.
TRAINED = ("model", "opt", "iter", "ema")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    env.update(extra or {})
    return env


def _cmd(nproc: int, *args: str) -> list[str]:
    if nproc == 0:  # a plain single process, no torch.distributed
        return [sys.executable, str(WORKER), *args]
    return torchrun_cmd(nproc, WORKER, args)


def run(nproc: int, work: Path, out: Path, *args: str, fails: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(nproc, "--work-dir", str(work), "--out", str(out), *args), cwd=REPO_ROOT,
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert (p.returncode != 0) == fails, f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def result(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def same_training(got: dict, want: dict) -> list[str]:
    return [d for k in TRAINED for d in state_diff(got[k], want[k], k, bitwise=True)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-process run with our checkpoints (w/iter_4, w/iter_8) and the
    same run with MMEngine's own runner and CheckpointHook (native/iter_4.pth, ...)."""
    root = tmp_path_factory.mktemp("mm_ref")
    run(2, root / "w", root / "out")
    run(2, root / "native", root / "native_out", "--native")
    return root


def test_training_is_unchanged_and_checkpoints_are_ours(reference: Path):
    for r in (0, 1):
        assert not same_training(result(reference / "out", r), result(reference / "native_out", r))
    assert (reference / "w" / "iter_4" / "manifest.json").exists()
    assert (reference / "native" / "iter_4.pth").is_file()
    assert (reference / "w" / "last_checkpoint").read_text().endswith("iter_8")


@pytest.mark.parametrize("source", ["ours", "native"])
def test_resume_from_ours_and_from_native_reaches_the_same_parameters(reference: Path, tmp_path: Path,
                                                                       source: str):
    """Bitwise: the same run resumed at iteration 4 from our checkpoint and from MMEngine's
    .pth (which MMEngine's own runner cannot load on torch >= 2.6) ends where the
    uninterrupted run ended."""
    src = reference / "w" / "iter_4" if source == "ours" else reference / "native" / "iter_4.pth"
    run(2, tmp_path / "w", tmp_path / "out", "--resume", "--load-from", str(src))
    for r in (0, 1):
        got = result(tmp_path / "out", r)
        assert got["started_at"] == 4
        assert not same_training(got, result(reference / "out", r))


# ----------------------------------------------------------------------------- killed mid-save


@pytest.mark.slow
def test_sigkill_during_a_save_then_resume_skips_the_torn_one(reference: Path, tmp_path: Path):
    work, torn = tmp_path / "w", tmp_path / "w" / "iter_8"
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen(_cmd(2, "--work-dir", str(work), "--out", str(tmp_path / "o1")), cwd=REPO_ROOT,
                                env=_env({"SLOW_SAVE_AT": "8"}), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while torn not in torn_checkpoints(work):
            assert proc.poll() is None, f"the run ended before the save at 8:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the save at iteration 8 never started"
            time.sleep(0.05)
        time.sleep(0.3)  # let every rank reach its (held) writes
    finally:
        kill_tree(proc.pid)
        proc.wait(60)
    assert not (torn / "manifest.json").exists()
    # MMEngine's own pointer would name the torn one after a later save; make it do so now
    (work / "last_checkpoint").write_text(str(torn))
    p = run(2, work, tmp_path / "o2", "--resume")
    assert "SkippedCheckpointWarning" in p.stderr and str(torn) in p.stderr
    for r in (0, 1):
        got = result(tmp_path / "o2", r)
        assert got["started_at"] == 4
        assert not same_training(got, result(reference / "out", r))
    assert (torn / "manifest.json").exists()  # the step was saved again, committed this time


# ----------------------------------------------------------------------------- world size


@pytest.mark.parametrize("nproc", [0, 3])
def test_saved_at_2_resumes_at_1_and_3(reference: Path, tmp_path: Path, nproc: int):
    """nproc 0: a plain process (launcher="none"); 3: torchrun with 3 processes."""
    run(nproc, tmp_path / "w", tmp_path / "out", "--resume", "--load-from", str(reference / "w" / "iter_4"))
    saved = torch.load(reference / "native" / "iter_4.pth", weights_only=False)
    ranks = range(max(nproc, 1))
    for r in ranks:
        got = result(tmp_path / "out", r)
        assert got["started_at"] == 4 and got["iter"] == 8
        assert set(got["model"]) == set(saved["state_dict"])
    # every rank resumed the same state: DDP keeps them identical from there on
    for r in ranks:
        assert not state_diff(result(tmp_path / "out", r)["model"], result(tmp_path / "out", 0)["model"], "m")
