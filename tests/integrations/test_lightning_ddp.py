"""shardckpt.lightning under DDP with real torchrun jobs (gloo, CPU): resume equals
Lightning's native resume bitwise, a checkpoint saved at 2 processes resumes at 1
and at 3, and a job SIGKILLed while a checkpoint is written (sync and async)
resumes from the newest valid one and finishes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from tests.helpers import assert_state_equal  # noqa: E402
from tests.integrations.launch import kill_when, run_workers, start_workers, torn_checkpoints  # noqa: E402

JOB = Path(__file__).with_name("_lightning_job.py")
STEPS_PER_EPOCH = 6  # 96 samples, batch 8, 2 ranks


def _run(nproc: int, *args: str, env: dict[str, str] | None = None, script: Path = JOB) -> str:
    return run_workers(nproc, script, args, env=env, timeout=300)[1]


def _first(d: Path) -> Path:
    return sorted(d.glob("epoch=0-*.ckpt"))[0]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-process DDP run of 3 epochs with our checkpoints and one with Lightning's."""
    root = tmp_path_factory.mktemp("ddp")
    for io in ("ours", "native"):
        _run(2, "--dir", str(root / io), "--io", io, "--epochs", "3", "--out", str(root / f"{io}-full.pt"))
    return {"root": root, "ours": root / "ours", "native": root / "native"}


def test_ddp_resume_matches_native_resume_bitwise(two_runs):
    root = two_runs["root"]
    for io in ("ours", "native"):
        _run(2, "--dir", str(root / f"{io}-again"), "--io", io, "--epochs", "3", "--resume", str(_first(two_runs[io])),
             "--out", str(root / f"{io}-resumed.pt"))
    ours, native = (torch.load(root / f"{io}-resumed.pt") for io in ("ours", "native"))
    assert ours["global_step"] == native["global_step"] == 3 * STEPS_PER_EPOCH
    assert_state_equal(ours["params"], native["params"], bitwise=True)
    # the uninterrupted runs agree too: our saves change nothing in training
    full = [torch.load(root / f"{io}-full.pt")["params"] for io in ("ours", "native")]
    assert_state_equal(full[0], full[1], bitwise=True)


@pytest.mark.parametrize("nproc", [1, 3])
def test_saved_at_two_processes_resumes_at_another_count(two_runs, nproc):
    from shardckpt.lightning import load_checkpoint

    root, ckpt = two_runs["root"], _first(two_runs["ours"])
    saved = load_checkpoint(ckpt)
    out = root / f"at{nproc}.pt"
    # max_epochs reached at the checkpoint: the model is exactly the saved one
    _run(nproc, "--dir", str(root / f"at{nproc}"), "--epochs", "1", "--resume", str(ckpt), "--out", str(out))
    got = torch.load(out)
    assert got["global_step"] == saved["global_step"] == STEPS_PER_EPOCH
    assert_state_equal(got["params"], saved["state_dict"], bitwise=True)
    # and training goes on at that count
    _run(nproc, "--dir", str(root / f"on{nproc}"), "--epochs", "2", "--resume", str(ckpt), "--out", str(out))
    assert torch.load(out)["global_step"] > STEPS_PER_EPOCH


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_while_saving_then_resume_from_the_newest_valid(tmp_path, mode):
    """Saves: 1 epoch 0, 2 last (epoch 0), 3 epoch 1 <- every process killed while it writes."""
    d = tmp_path / "ckpts"
    extra = ["--async"] if mode == "async" else []
    log = tmp_path / "killed.log"
    run = start_workers(2, JOB, ["--dir", str(d), "--epochs", "3", *extra], log, env={"JOB_HOLD_SAVE": "3"})
    kill_when(run, lambda: any(p.name.startswith("epoch=1") for p in torn_checkpoints(d)), log)
    torn = [p for p in torn_checkpoints(d) if p.name.startswith("epoch=1")]
    assert torn, log.read_text()[-3000:]
    log = _run(2, "--dir", str(d), "--epochs", "3", "--resume", "latest", *extra, "--out", str(tmp_path / "r.pt"))
    assert f"skipping incomplete checkpoint {torn[0]}" in log
    got = torch.load(tmp_path / "r.pt")
    assert got["resumed_from"] == str(d / "last.ckpt")  # the newest commit: epoch 0's last.ckpt
    assert got["global_step"] == 3 * STEPS_PER_EPOCH
    # epoch 1 saved again, to the end (Lightning names it -v1: the torn directory exists)
    assert (d / f"{torn[0].stem}-v1.ckpt" / "manifest.json").is_file()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    """ModelParallelStrategy (FSDP2 over 2 gloo ranks) runs: ours (async saves) and Lightning's."""
    root = tmp_path_factory.mktemp("fsdp2")
    _run(2, "--dir", str(root / "ours"), "--sharded", "mp", "--async", "--epochs", "2")
    _run(2, "--dir", str(root / "native"), "--io", "native", "--sharded", "mp", "--epochs", "2")
    return root


def test_model_parallel_resume_matches_native_resume_bitwise(sharded_runs):
    root = sharded_runs
    for io in ("ours", "native"):
        _run(2, "--dir", str(root / f"{io}-again"), "--io", io, "--sharded", "mp", "--epochs", "2",
             "--resume", str(_first(root / io)), "--out", str(root / f"{io}.pt"))
    ours, native = (torch.load(root / f"{io}.pt") for io in ("ours", "native"))
    assert ours["global_step"] == native["global_step"] > 0
    assert_state_equal(ours["params"], native["params"], bitwise=True)


@pytest.mark.parametrize("nproc", [1, 3])
def test_model_parallel_checkpoint_reshards_to_another_count(sharded_runs, nproc):
    from shardckpt.lightning import load_checkpoint

    ckpt = _first(sharded_runs / "ours")
    saved = load_checkpoint(ckpt)  # the whole tensors, read without a process group
    out = sharded_runs / f"mp-at{nproc}.pt"
    _run(nproc, "--dir", str(sharded_runs / f"mp-at{nproc}"), "--sharded", "mp", "--epochs", "1",
         "--resume", str(ckpt), "--out", str(out))
    got = torch.load(out)
    assert got["global_step"] == saved["global_step"]
    assert_state_equal(got["params"], saved["state_dict"], bitwise=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="FSDP1 needs 2 GPUs")
def test_fsdp_strategy_resume_matches_native_on_gpus(tmp_path):
    for io in ("ours", "native"):
        _run(2, "--dir", str(tmp_path / io), "--io", io, "--sharded", "fsdp", "--accelerator", "cuda", "--epochs", "2")
        _run(2, "--dir", str(tmp_path / f"{io}-again"), "--io", io, "--sharded", "fsdp", "--accelerator", "cuda",
             "--epochs", "2", "--resume", str(_first(tmp_path / io)), "--out", str(tmp_path / f"{io}.pt"))
    ours, native = (torch.load(tmp_path / f"{io}.pt") for io in ("ours", "native"))
    assert_state_equal(ours["params"], native["params"], bitwise=True)


def test_the_example_runs_and_resumes_at_another_process_count(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "lightning_example.py"
    first = _run(2, "--dir", str(tmp_path), "--epochs", "2", script=example)
    assert "finished at epoch 2" in first
    again = _run(1, "--dir", str(tmp_path), "--epochs", "3", script=example)
    assert f"Restored all states from the checkpoint at {tmp_path}" in again
    assert "finished at epoch 3" in again
