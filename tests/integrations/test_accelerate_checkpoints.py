"""shardckpt.accelerate with the real Accelerate package, in real processes (torchrun, gloo
on CPU, where Accelerate runs DDP): equivalence with ``accelerator.save_state``, SIGKILL
during a sync and an async save then resume, a changed world size, bad input, async
failures and the end of a run; the example script. Every run is the worker
``_accelerate_worker.py`` (a tiny MLP, 12 steps, a checkpoint every 4).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, state_diff

pytest.importorskip("accelerate")

WORKER = Path(__file__).with_name("_accelerate_worker.py")
#: What a resumed run must reproduce exactly: parameters, optimizer state, the registered object.
TRAINED = ("model", "opt", "step", "losses")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    env.update(extra or {})
    return env


def _cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(WORKER), *args]


def run(nproc: int, project: Path, out: Path, *args: str, env: dict[str, str] | None = None,
        fails: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(nproc, "--project", str(project), "--out", str(out), *args), cwd=REPO_ROOT,
                       env=_env(env), capture_output=True, text=True, timeout=240)
    # a worker stopped by a shardckpt error exits 3; torchrun reports any failed worker as 1
    assert (p.returncode != 0) == fails, f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def result(out: Path, name: str) -> dict:
    return torch.load(out / name, weights_only=True)


def same_training(got: dict, want: dict, keys: tuple[str, ...] = TRAINED) -> list[str]:
    return [d for k in keys for d in state_diff(got[k], want[k], k, bitwise=True)]


def same_as_uninterrupted(got: dict, want: dict, rank: int) -> list[str]:
    """Registered objects come back as the main process's copy on every rank (Accelerate's
    own rule), so rank 1's loss history is rank 0's up to the checkpoint: compared on rank 0."""
    return same_training(got, want, TRAINED if rank == 0 else ("model", "opt", "step"))


def files_under(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-process run: our checkpoints under checkpoints/, Accelerate's own
    beside them under native/ (same run, same steps), final state in out/."""
    root = tmp_path_factory.mktemp("acc_ref")
    run(2, root / "p", root / "out", "--also-native")
    return root


def copy_project(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference / "p", dest)
    return dest


# ----------------------------------------------------------------------------- equivalence


def test_resume_from_ours_equals_resume_from_native(reference: Path, tmp_path: Path):
    """The control is Accelerate's own checkpoint of the same step of the same run: both
    resumes end bitwise equal (model, optimizer, registered object, RNG), and equal to the
    uninterrupted run's training state (RNG aside: resuming re-creates dataloaders)."""
    ours = copy_project(reference, tmp_path / "ours")
    native = copy_project(reference, tmp_path / "native")
    run(2, ours, tmp_path / "o_ours", "--resume", str(ours / "checkpoints" / "checkpoint_0"))
    run(2, native, tmp_path / "o_native", "--mode", "native", "--resume", str(native / "native" / "checkpoint_4"))
    for r in (0, 1):
        got, control = result(tmp_path / "o_ours", f"rank{r}.pt"), result(tmp_path / "o_native", f"rank{r}.pt")
        assert not same_training(got, control), same_training(got, control)
        assert not state_diff(got["rng"], control["rng"], bitwise=True)
        assert got["acc_step"] == control["acc_step"]
        assert not same_as_uninterrupted(got, result(reference / "out", f"rank{r}.pt"), r)
        # right after the load: exactly what was saved at step 4
        loaded, saved = result(tmp_path / "o_ours", f"loaded{r}.pt"), result(reference / "out", f"saved4_{r}.pt")
        assert not same_as_uninterrupted(loaded, saved, r) and not state_diff(loaded["rng"], saved["rng"], bitwise=True)
    # the next save continued the numbering after the loaded one
    assert (ours / "checkpoints" / "checkpoint_3" / "manifest.json").exists()


def test_total_limit_keeps_the_newest(tmp_path: Path):
    run(1, tmp_path / "p", tmp_path / "o", "--total-limit", "2")
    assert sorted(os.listdir(tmp_path / "p" / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]


# ----------------------------------------------------------------------------- world size


@pytest.mark.parametrize("nproc", [1, 3])
def test_saved_at_two_resumes_at_another_world_size(reference: Path, tmp_path: Path, nproc: int):
    project = copy_project(reference, tmp_path / "p")
    p = run(nproc, project, tmp_path / "o", "--resume", str(project / "checkpoints" / "checkpoint_1"))
    saved = [result(reference / "out", f"saved8_{r}.pt") for r in (0, 1)]
    for r in range(nproc):
        loaded = result(tmp_path / "o", f"loaded{r}.pt")
        assert not same_as_uninterrupted(loaded, saved[0], 0), same_as_uninterrupted(loaded, saved[0], 0)
        if r < 2:  # a rank that existed at save time gets its own RNG stream back
            assert not state_diff(loaded["rng"], saved[r]["rng"], bitwise=True)
        else:  # a new rank: a stream derived from rank 0's, not a copy of it
            assert state_diff(loaded["rng"], saved[0]["rng"], bitwise=True)
        assert result(tmp_path / "o", f"rank{r}.pt")["step"] == 12  # and the run finished
    assert "RngReshardWarning" in p.stderr


# ----------------------------------------------------------------------------- bad input


def _native_dir(reference: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "native_ckpt"
    shutil.copytree(reference / "p" / "native" / "checkpoint_4", dest)
    return dest


def _flipped(reference: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "flipped"
    shutil.copytree(reference / "p" / "checkpoints" / "checkpoint_0", dest)
    shard = max((dest / "data").glob("*.bin"), key=lambda p: p.stat().st_size)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    return dest


def _other_model(reference: Path, tmp_path: Path) -> Path:
    run(1, tmp_path / "narrow", tmp_path / "o_narrow", "--width", "16", "--steps", "4")
    return tmp_path / "narrow" / "checkpoints" / "checkpoint_0"


@pytest.mark.parametrize("case,want_type,want_key", [
    ("not_a_checkpoint", ("CheckpointNotFoundError", "IncompleteCheckpointError"), None),
    ("native_checkpoint", ("CheckpointNotFoundError", "IncompleteCheckpointError"), None),
    ("flipped_bit", ("CorruptCheckpointError",), ""),
    ("other_model", ("CheckpointMismatchError",), "models.0.0."),  # width 16 vs 32: first layer's shapes
])
def test_bad_input_stops_with_a_typed_error_and_deletes_nothing(reference, tmp_path, case, want_type, want_key):
    target = {
        "not_a_checkpoint": lambda: _write_notes(tmp_path / "notes"),
        "native_checkpoint": lambda: _native_dir(reference, tmp_path),
        "flipped_bit": lambda: _flipped(reference, tmp_path),
        "other_model": lambda: _other_model(reference, tmp_path),
    }[case]()
    before = files_under(target)
    run(1, tmp_path / "p", tmp_path / "o", "--resume", str(target), fails=True)
    err = json.loads((tmp_path / "o" / "error0.json").read_text())
    assert err["type"] in want_type, err
    assert str(target) in err["message"] and err["step"] == 0, err
    if want_key is not None:
        # the key as stored ("models.0.0.bias"); the message names it within its part ("models.0": '0.bias')
        assert err["key"] and err["key"].startswith(want_key) and err["key"].split(".", 2)[-1] in err["message"], err
    assert files_under(target) == before  # nothing deleted or rewritten


def _write_notes(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("not a checkpoint")
    return path


# ----------------------------------------------------------------------------- killed mid-save


def _kill_during_save(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    project, torn = tmp_path / "p", tmp_path / "p" / "checkpoints" / "checkpoint_1"
    proc = subprocess.Popen(_cmd(2, "--project", str(project), "--out", str(tmp_path / "o1"), *extra),
                            cwd=REPO_ROOT, env=_env({"SLOW_SAVE_AT": "8"}), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not ((torn / "data").exists() and not (torn / "manifest.json").exists()):
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the save at step 8"
            assert time.monotonic() < deadline, "the save at step 8 never started"
            time.sleep(0.05)
        time.sleep(0.3)  # let every rank reach its (held) writes
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (torn / "manifest.json").exists()
    return project, torn


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_a_save_then_resume_skips_the_torn_one(reference: Path, tmp_path: Path, mode: str):
    extra = ("--async",) if mode == "async" else ()
    project, torn = _kill_during_save(tmp_path, *extra)
    p = run(2, project, tmp_path / "o2", "--resume", "auto", *extra)
    assert (tmp_path / "o2" / "resumed0.txt").read_text().endswith("checkpoint_0")
    assert "SkippedCheckpointWarning" in p.stderr and str(torn) in p.stderr
    for r in (0, 1):
        got = result(tmp_path / "o2", f"rank{r}.pt")
        assert not same_as_uninterrupted(got, result(reference / "out", f"rank{r}.pt"), r)
    assert torn.exists()  # the torn one is skipped, not deleted (total_limit would prune it first)


# ----------------------------------------------------------------------------- async


@pytest.mark.parametrize("vanish_at,raised_at", [(4, 8), (12, 12)])
def test_failed_async_save_surfaces_at_the_next_save_or_the_end(tmp_path: Path, vanish_at: int, raised_at: int):
    """The directory of the async save at ``vanish_at`` is removed under its background
    write: the next ``save_state`` (or ``end_training`` after the last one) raises it."""
    run(2, tmp_path / "p", tmp_path / "o", "--async", env={"VANISH_AT": str(vanish_at)}, fails=True)
    for r in (0, 1):
        err = json.loads((tmp_path / "o" / f"error{r}.json").read_text())
        assert err["type"] == "CheckpointWriteError" and err["step"] == raised_at, err
    assert not (tmp_path / "o" / "rank0.pt").exists()


def test_end_of_run_waits_for_the_last_async_commit(tmp_path: Path):
    run(2, tmp_path / "p", tmp_path / "o", "--async", env={"HOLD_LAST_S": "2"})
    for r in (0, 1):
        assert json.loads((tmp_path / "o" / f"end{r}.json").read_text()) == {"last_committed_at_end": True}
    assert (tmp_path / "p" / "checkpoints" / "checkpoint_2" / "manifest.json").exists()


# ----------------------------------------------------------------------------- FSDP2 and the example


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 1, reason="FSDP2 needs CUDA")
def test_fsdp2_round_trip_on_gpu(tmp_path: Path):
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={min(2, torch.cuda.device_count())}", str(REPO_ROOT / "examples" / "accelerate_example.py"),
         "--project", str(tmp_path / "p"), "--fsdp2", "--check-resume"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-6000:]
    assert "resumed from" in p.stdout and "fsdp2=True" in p.stdout


def test_example_runs_and_resumes(tmp_path: Path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO_ROOT / "examples" / "accelerate_example.py"), "--project", str(tmp_path / "p"), "--check-resume"]
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-6000:]
    assert "resumed from" in p.stdout and "checkpoint_" in p.stdout


def test_without_accelerate_the_import_says_what_to_install():
    code = ("import sys; sys.modules['accelerate'] = None\n"
            "try:\n    import shardckpt.accelerate\nexcept ImportError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert 'pip install "shardckpt[accelerate]"' in p.stdout, p.stdout + p.stderr
