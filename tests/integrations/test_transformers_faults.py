"""shardckpt.transformers under faults: every process SIGKILLed while a checkpoint
is being written (sync and async) and the next run resuming past the torn one;
bad input (not a checkpoint, a flipped bit, another model's checkpoint) stopping
the run with a typed error naming path and key and deleting nothing; a failed
background save surfacing in the trainer; the run's end waiting for the last commit."""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import shardckpt  # noqa: E402
from shardckpt.errors import (  # noqa: E402
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ShardckptError,
)
from shardckpt.integrations import SkippedCheckpointWarning  # noqa: E402
from shardckpt.transformers import ShardckptTrainer  # noqa: E402
from tests.helpers import gate_writes  # noqa: E402
from tests.integrations._transformers_worker import TinyDataset, make_args, tiny_model  # noqa: E402
from tests.integrations.launch import kill_when, result_of, run_workers, start_workers  # noqa: E402
from tests.manifest_view import entries_view  # noqa: E402

WORKER = Path(__file__).with_name("_transformers_worker.py")


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_mid_save_then_resume_skips_the_torn_checkpoint(tmp_path: Path, async_save: bool) -> None:
    out, log = tmp_path / "run", tmp_path / "first.log"
    flags = ["--async-save"] if async_save else []
    proc = start_workers(2, WORKER, ["--out", str(out), "--max-steps", "6", "--save-steps", "2", *flags], log,
                         env={"SHARDCKPT_TEST_SLOW_SAVE": "2"})  # the save at step 4 hangs in its writes
    torn = out / "checkpoint-4"
    kill_when(proc, lambda: (torn / "data").is_dir() and not (torn / "manifest.json").exists(), log)
    assert (out / "checkpoint-2" / "manifest.json").is_file() and not (torn / "manifest.json").exists()
    kept = _files(out / "checkpoint-2")

    _, output = run_workers(2, WORKER, ["--out", str(out), "--max-steps", "6", "--save-steps", "2",
                                        "--resume", "true", *flags])
    res = result_of(output)
    assert "SkippedCheckpointWarning" in output and f"skipping incomplete checkpoint {torn}" in output
    assert res["resumed_from"] == str(out / "checkpoint-2")
    assert res["global_step"] == 6 and len(res["losses"]) == 6  # 2 restored with the log history
    assert _files(out / "checkpoint-2") == kept  # the checkpoint resumed from is untouched
    for step in (4, 6):  # the torn directory was replaced by a complete checkpoint
        assert shardckpt.verify(out / f"checkpoint-{step}").chunks > 0


# -- in one process: bad input, async failures

@pytest.fixture(autouse=True)
def _close_background_engine() -> Any:
    yield
    shardckpt.close()


def _trainer(out: Path, max_steps: int = 2, save_steps: int = 2, width: int = 32, **kw: Any) -> ShardckptTrainer:
    extra = {k: kw.pop(k) for k in list(kw) if k not in ("async_save", "storage_options", "eval_dataset")}
    return ShardckptTrainer(model=tiny_model(width), args=make_args(str(out), max_steps, save_steps, **extra),
                            train_dataset=TinyDataset(), **kw)


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tf_bad") / "run"
    _trainer(out).train()
    shardckpt.close()
    return out / "checkpoint-2"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run" / src.name
    shutil.copytree(src, dst)
    return dst


def test_not_a_checkpoint(tmp_path: Path) -> None:
    notes = tmp_path / "run" / "checkpoint-9"
    notes.mkdir(parents=True)
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointNotFoundError, match="is not a shardckpt checkpoint") as e:
        _trainer(tmp_path / "run").train(resume_from_checkpoint=str(notes))
    assert e.value.path == str(notes)
    assert (notes / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at"):
        _trainer(tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointNotFoundError, match="no complete, valid shardckpt checkpoint"):
        _trainer(tmp_path / "run").train(resume_from_checkpoint=True)
    assert (notes / "notes.txt").read_text() == "mine"


def test_flipped_bit_in_a_chunk(one_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(one_checkpoint, tmp_path)
    key = "model.transformer.wte.weight"
    blob = entries_view(ckpt)[key]["shards"][0]
    data = ckpt / blob["file"]
    raw = bytearray(data.read_bytes())
    raw[blob["offset"] + 17] ^= 0x04
    data.write_bytes(bytes(raw))
    before = _files(ckpt)
    with pytest.raises(CorruptCheckpointError) as e:
        _trainer(tmp_path / "run").train(resume_from_checkpoint=str(ckpt))
    assert e.value.key == key and str(ckpt) in str(e.value)
    with pytest.warns(SkippedCheckpointWarning, match=f"skipping corrupt checkpoint {ckpt}"):
        with pytest.raises(CheckpointNotFoundError):
            _trainer(tmp_path / "run").train(resume_from_checkpoint=True)
    assert _files(ckpt) == before  # nothing deleted, nothing rewritten


def test_another_models_checkpoint(one_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(one_checkpoint, tmp_path)
    before = _files(ckpt)
    with pytest.raises(CheckpointMismatchError) as e:
        _trainer(tmp_path / "run", width=48).train(resume_from_checkpoint=str(ckpt))
    assert e.value.key == "model.lm_head.weight"  # the first key (sorted) that does not fit
    assert "transformer.wte.weight" in e.value.mismatched and not e.value.missing
    assert str(ckpt) in str(e.value) and "shape [32" in str(e.value)
    assert _files(ckpt) == before


def test_background_save_failure_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shardckpt.io.save_target import SaveTarget

    def broken(self: Any, *args: Any) -> Any:
        raise OSError("injected: the disk went away")

    monkeypatch.setattr(SaveTarget, "write_items", broken)
    trainer = _trainer(tmp_path / "run", max_steps=4, async_save=True)
    with pytest.raises(ShardckptError, match="injected: the disk went away"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-2" / "manifest.json").exists()
    assert not (tmp_path / "run" / "checkpoint-4").exists()  # the run stopped at the next save


def test_run_end_waits_for_the_last_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = gate_writes(monkeypatch, wait_s=60)
    threading.Timer(1.0, gate.set).start()  # the writes are held for a second after staging
    _trainer(tmp_path / "run", async_save=True).train()
    assert gate.is_set()
    assert shardckpt.verify(tmp_path / "run" / "checkpoint-2").chunks > 0


def test_save_total_limit_and_best_model(tmp_path: Path) -> None:
    """Retention keeps its meaning: at most ``save_total_limit`` committed checkpoints,
    never the best one; ``load_best_model_at_end`` loads the best from ours."""
    out = tmp_path / "run"
    trainer = _trainer(out, max_steps=8, save_steps=2, save_total_limit=2, eval_strategy="steps", eval_steps=2,
                       metric_for_best_model="loss", greater_is_better=True, load_best_model_at_end=True,
                       eval_dataset=TinyDataset(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    best = trainer.state.best_model_checkpoint
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert best is not None and os.path.basename(best) in kept and "checkpoint-8" in kept and len(kept) <= 2
    # the best weights are those stored in the best checkpoint
    from shardckpt.integrations import load_tree

    stored = load_tree(best)["model"]
    live = trainer.model.state_dict()
    assert all(stored[k].equal(live[k]) for k in stored)


def test_native_checkpoint_path_is_resumed_by_trainers_own_code(tmp_path: Path) -> None:
    """Switching mid-run: a native checkpoint given as a path resumes; the next
    checkpoints are shardckpt's, and ``resume_from_checkpoint=True`` ignores the native one."""
    from transformers import Trainer

    out = tmp_path / "run"
    Trainer(model=tiny_model(), args=make_args(str(out), 2, 2), train_dataset=TinyDataset()).train()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    trainer = _trainer(out, max_steps=4)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert trainer.resumed_from is None and trainer.state.global_step == 4
    assert shardckpt.verify(out / "checkpoint-4").chunks > 0
    again = _trainer(out, max_steps=6)
    again.train(resume_from_checkpoint=True)
    assert again.resumed_from == str(out / "checkpoint-4")
