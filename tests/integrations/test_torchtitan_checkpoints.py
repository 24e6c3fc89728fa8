"""shardckpt.torchtitan with torchtitan's own llama3 model, OptimizersContainer,
LRSchedulersContainer and ParallelAwareDataloader on FSDP2 (gloo, CPU, real
torchrun processes): resume equals torchtitan's native DCP resume bitwise, a
kill mid-save resumes from the previous step, 2 -> 1 and 3 processes, bad input.
The trainer itself needs CUDA (``torch.cuda.set_device`` in ``__init__``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan.components.checkpointer")
pytest.importorskip("torchtitan.models.llama3")  # needs triton importable (its kernels module)

from tests.integrations.launch import (  # noqa: E402
    REPO_ROOT,
    kill_when,
    run_workers,
    start_workers,
    torn_checkpoints,
)

WORKER = REPO_ROOT / "tests" / "integrations" / "_torchtitan_worker.py"


def run(nproc: int, root: Path, out: Path, *args: str, ok: bool = True) -> str:
    code, output = run_workers(nproc, WORKER, ["--root", str(root), "--out", str(out), *args], expect_ok=False)
    assert (code == 0) == ok, output[-6000:]
    return output


def final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def error(out: Path) -> dict:
    return json.loads((out / "error0.json").read_text())


def assert_same_params(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Ours, 2 processes, 4 steps: step-2 and step-4 under root/checkpoint."""
    base = tmp_path_factory.mktemp("tt")
    run(2, base / "root", base / "out", "--steps", "4")
    return base


def test_resume_matches_torchtitans_native_dcp_resume_bitwise(saved: Path, tmp_path: Path):
    run(2, tmp_path / "native", tmp_path / "n4", "--steps", "4", "--manager", "native")
    ours = tmp_path / "ours"
    shutil.copytree(saved / "root", ours)
    assert (ours / "checkpoint" / "step-4" / "manifest.json").exists()
    assert (tmp_path / "native" / "checkpoint" / "step-4" / ".metadata").exists()
    assert_same_params(final(saved / "out"), final(tmp_path / "n4"))
    out = run(2, ours, tmp_path / "o8", "--steps", "8")
    assert "resumed at step 4" in out
    run(2, tmp_path / "native", tmp_path / "n8", "--steps", "8", "--manager", "native")
    a, b = final(tmp_path / "o8"), final(tmp_path / "n8")
    assert (a["step"], a["ntokens"], a["lr"]) == (b["step"], b["ntokens"], b["lr"]) and a["step"] == 8
    assert_same_params(a, b)


@pytest.mark.parametrize("nproc", [1, 3])
def test_saved_at_2_resumes_at_1_and_3(saved: Path, tmp_path: Path, nproc: int):
    root = tmp_path / "root"
    shutil.copytree(saved / "root", root)
    out = run(nproc, root, tmp_path / "o", "--steps", "4")  # load only: nothing left to train
    assert "resumed at step 4" in out and "StateReshardWarning" in out  # the loaders' positions
    assert_same_params(final(tmp_path / "o"), final(saved / "out"))


@pytest.mark.slow
def test_sigkill_mid_save_resumes_from_the_previous_step(tmp_path: Path):
    root, log = tmp_path / "root", tmp_path / "log"
    proc = start_workers(2, WORKER, ["--root", str(root), "--out", str(tmp_path / "o"), "--steps", "6"], log,
                         env={"SLOW_SAVE_AT": "4"})
    torn = root / "checkpoint" / "step-4"
    kill_when(proc, lambda: torn in torn_checkpoints(root), log)
    proc.wait()
    assert torn_checkpoints(root) == [torn]
    out = run(2, root, tmp_path / "o", "--steps", "6")
    assert "SkippedCheckpointWarning" in out and str(torn) in out and "resumed at step 2" in out
    assert final(tmp_path / "o")["step"] == 6
    ref = tmp_path / "ref"
    run(2, ref, tmp_path / "r", "--steps", "6")
    assert_same_params(final(tmp_path / "o"), final(tmp_path / "r"))


def _flip_a_bit(ckpt: Path) -> Path:
    shard = max((p for p in (ckpt / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    return shard


def test_a_flipped_bit_is_a_typed_error_naming_path_and_key(saved: Path, tmp_path: Path):
    root = tmp_path / "root"
    shutil.copytree(saved / "root", root)
    shard = _flip_a_bit(root / "checkpoint" / "step-4")
    run(1, root, tmp_path / "o", "--steps", "4", "--load-step", "4", ok=False)
    e = error(tmp_path / "o")
    assert e["type"] == "CorruptCheckpointError" and "step-4" in e["path"] and e["key"], e
    assert shard.exists() and (root / "checkpoint" / "step-2" / "manifest.json").exists()  # nothing deleted


def test_another_models_checkpoint_names_the_key(saved: Path, tmp_path: Path):
    root = tmp_path / "root"
    shutil.copytree(saved / "root", root)
    run(1, root, tmp_path / "o", "--steps", "4", "--dim", "32", ok=False)
    e = error(tmp_path / "o")
    assert e["type"] == "CheckpointMismatchError" and e["key"] == "lm_head.weight" and "step-4" in e["path"], e
    assert (root / "checkpoint" / "step-4" / "manifest.json").exists()


def test_not_a_checkpoint_as_initial_load_path(tmp_path: Path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a checkpoint")
    run(1, tmp_path / "root", tmp_path / "o", "--steps", "2", "--initial-load-path", str(junk), ok=False)
    e = error(tmp_path / "o")
    assert e["type"] == "CheckpointNotFoundError" and str(junk) in e["path"], e
    assert (junk / "notes.txt").exists()


def test_the_package_names_its_extra_without_torchtitan(tmp_path: Path):
    code = ("import sys; sys.modules['torchtitan'] = None\n"
            "try:\n import shardckpt.torchtitan\nexcept ImportError as e: print(e)")
    p = subprocess.run([__import__("sys").executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert 'shardckpt[torchtitan]' in p.stdout, p.stdout + p.stderr


def test_async_saves_with_keep_latest_k_resume_like_sync_ones(saved: Path, tmp_path: Path):
    """async_mode="async" (shardckpt's staging) saving every step with keep_latest_k=2:
    the newest step and at least k committed ones remain, every one verifies, and
    resuming from the async step-4 ends where resuming from the sync step-4 does,
    bitwise. (Which older steps an async purge has reached by the end depends on
    when each background commit lands, for torchtitan's own async saves too.)"""
    from shardckpt import verify

    run(2, tmp_path / "a", tmp_path / "a4", "--steps", "4", "--interval", "1", "--async-mode", "async",
        "--keep", "2")
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoint").iterdir())
    assert "step-4" in kept and "step-3" in kept
    for name in kept:
        verify(tmp_path / "a" / "checkpoint" / name)
    assert "resumed at step 4" in run(2, tmp_path / "a", tmp_path / "a8", "--steps", "8")
    sync = tmp_path / "s"
    shutil.copytree(saved / "root", sync)
    run(2, sync, tmp_path / "s8", "--steps", "8")
    assert_same_params(final(tmp_path / "a8"), final(tmp_path / "s8"))


def test_keep_latest_k_deletes_what_torchtitan_deletes(tmp_path: Path):
    """Sync saves every step, keep_latest_k=2: step-1 is purged (un-committed first) as
    torchtitan's own purge does; the same steps remain."""
    args = ("--steps", "4", "--interval", "1", "--keep", "2")
    run(2, tmp_path / "a", tmp_path / "a4", *args)
    run(2, tmp_path / "n", tmp_path / "n4", *args, "--manager", "native")
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoint").iterdir())
    assert kept == sorted(p.name for p in (tmp_path / "n" / "checkpoint").iterdir())
    assert "step-1" not in kept and "step-4" in kept
