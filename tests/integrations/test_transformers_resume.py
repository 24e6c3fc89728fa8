"""shardckpt.transformers: a run resumed from a ShardckptTrainer checkpoint
matches the same run resumed from Transformers' own checkpoint (the control), and
a checkpoint saved at 2 processes resumes at 1 and at 3. Real torchrun processes,
DDP through gloo on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from shardckpt import verify  # noqa: E402
from tests.helpers import REPO_ROOT, assert_state_equal  # noqa: E402
from tests.integrations.launch import result_of, run_workers  # noqa: E402

WORKER = Path(__file__).with_name("_transformers_worker.py")


def _run(nproc: int, out: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    _, output = run_workers(nproc, WORKER, ["--out", str(out), *args], env=env)
    return result_of(output)


def test_resume_matches_native_resume_bitwise(tmp_path: Path) -> None:
    """6 steps, a checkpoint at step 3, then a second run resumed from it: the
    final weights from ours equal, bit for bit, those from the native checkpoint."""
    finals = {}
    for trainer in ("native", "ours"):
        out = tmp_path / trainer
        full = _run(2, out, "--trainer", trainer, "--max-steps", "6", "--save-steps", "3",
                    "--final", str(tmp_path / f"{trainer}_uninterrupted.pt"))
        assert full["global_step"] == 6
        resumed = _run(2, out, "--trainer", trainer, "--max-steps", "6", "--save-steps", "3",
                       "--resume", str(out / "checkpoint-3"), "--final", str(tmp_path / f"{trainer}_resumed.pt"))
        assert resumed["global_step"] == 6
        # the resumed run logs only the steps after 3, with the losses the first run had there
        assert resumed["losses"][-3:] == full["losses"][-3:], trainer
        finals[trainer] = resumed
    assert finals["native"]["resumed_from"] is None
    assert finals["ours"]["resumed_from"] == str(tmp_path / "ours" / "checkpoint-3")
    native = torch.load(tmp_path / "native_resumed.pt", weights_only=True)
    ours = torch.load(tmp_path / "ours_resumed.pt", weights_only=True)
    assert_state_equal(ours, native, "resumed from ours vs from native", bitwise=True)
    # Trainer's own resume is bitwise on this run; so is ours, against the uninterrupted run
    uninterrupted = torch.load(tmp_path / "native_uninterrupted.pt", weights_only=True)
    assert_state_equal(native, uninterrupted, "native resume vs uninterrupted", bitwise=True)
    assert_state_equal(ours, uninterrupted, "our resume vs uninterrupted", bitwise=True)
    # what ShardckptTrainer wrote is a shardckpt checkpoint and nothing else
    assert sorted(p.name for p in (tmp_path / "ours" / "checkpoint-3").iterdir()) == ["data", "manifest.json"]
    assert verify(tmp_path / "ours" / "checkpoint-3").chunks > 0  # raises on any damage


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 4 steps at 2 processes with its checkpoint at step 4 (and the
    weights it ended with, which the checkpoint holds)."""
    base = tmp_path_factory.mktemp("tf_world")
    _run(2, base / "run", "--max-steps", "4", "--save-steps", "4", "--final", str(base / "at_save.pt"))
    return base


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_at_another_world_size(saved_at_two: Path, tmp_path: Path, nproc: int) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # a copy: each world size resumes from the same checkpoint and writes its own
    shutil.copytree(saved_at_two / "run" / "checkpoint-4", out / "checkpoint-4")
    loaded = tmp_path / "loaded.pt"
    res = _run(nproc, out, "--max-steps", "7", "--save-steps", "7", "--resume", "true",
               "--dump-after-load", str(loaded))
    assert res["world_size"] == nproc
    assert res["resumed_from"] == str(out / "checkpoint-4")
    assert res["global_step"] == 7 and len(res["losses"]) == 7  # 4 in the restored log history, 3 new
    want = torch.load(saved_at_two / "at_save.pt", weights_only=True)
    assert_state_equal(torch.load(loaded, weights_only=True), want, f"weights resumed at {nproc}", bitwise=True)
    assert verify(out / "checkpoint-7").chunks > 0  # raises on any damage


def test_example_runs_under_torchrun(tmp_path: Path) -> None:
    """examples/transformers_example.py: trains, is killed by nothing, resumes from its own checkpoint."""
    example = REPO_ROOT / "examples" / "transformers_example.py"
    _, first = run_workers(2, example, ["--output-dir", str(tmp_path), "--max-steps", "4"])
    assert "checkpoint-4" in first and (tmp_path / "checkpoint-4" / "manifest.json").is_file()
    _, second = run_workers(2, example, ["--output-dir", str(tmp_path), "--max-steps", "6"])
    assert f"resumed from {tmp_path / 'checkpoint-4'}" in second
    assert (tmp_path / "final_model" / "config.json").is_file()  # save_model still writes HF files
