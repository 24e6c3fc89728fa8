"""shardckpt.lightning in one process with the real Lightning: the checkpoint dict
round-trips exactly, resume matches Lightning's native resume bitwise, ``latest``
skips torn and corrupt checkpoints, bad input is refused with typed errors, async
saves fail loudly and the run's end waits for the last commit."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from shardckpt.errors import (  # noqa: E402
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ShardckptError,
)
from shardckpt.integrations import SkippedCheckpointWarning  # noqa: E402
from shardckpt.lightning import ShardckptCheckpointIO, latest, load_checkpoint, load_from_checkpoint  # noqa: E402
from tests.helpers import assert_state_equal  # noqa: E402
from tests.integrations._lightning_job import Net, data, trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")


def _fit(tmp: Path, io: str, epochs: int, resume: str | None = None, width: int = 16, **kw) -> tuple[Net, pl.Trainer]:
    pl.seed_everything(0, workers=True)
    t = trainer(str(tmp), io, epochs, devices=1, **kw)
    model = Net(width)
    t.fit(model, data(), ckpt_path=resume)
    return model, t


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _first_chunk_file(ckpt: Path) -> Path:
    return max((p for p in (ckpt / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_checkpoint_dict_round_trips_exactly(tmp_path):
    """What load_checkpoint returns is what Lightning gave save_checkpoint: every key,
    container type (empty loop dicts, int-keyed optimizer state, tuples) and tensor."""
    _, t = _fit(tmp_path / "run", "native", 1)
    checkpoint = t._checkpoint_connector.dump_checkpoint()
    io = ShardckptCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "x.ckpt")
    assert_state_equal(io.load_checkpoint(tmp_path / "x.ckpt"), checkpoint, bitwise=True, exact_types=True)
    native = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)
    assert set(load_checkpoint(tmp_path / "x.ckpt")) == set(native)


def test_resume_matches_lightnings_native_resume_bitwise(tmp_path):
    got = {}
    for io in ("native", "ours"):
        _fit(tmp_path / io, io, 3)
        first = sorted((tmp_path / io).glob("epoch=0-*.ckpt"))[0]
        model, t = _fit(tmp_path / io, io, 3, resume=str(first))
        assert t.global_step == 36
        got[io] = model.state_dict()
    assert_state_equal(got["ours"], got["native"], bitwise=True)


def test_last_and_load_from_checkpoint(tmp_path):
    model, _ = _fit(tmp_path, "ours", 2)
    assert (tmp_path / "last.ckpt" / "manifest.json").is_file()
    again, t = _fit(tmp_path, "ours", 2, resume="last")  # Lightning's meaning: nothing left to train
    assert t.global_step == 24
    assert_state_equal(again.state_dict(), model.state_dict(), bitwise=True)
    loaded = load_from_checkpoint(Net, tmp_path / "last.ckpt")
    assert loaded.hparams.width == 16
    assert_state_equal(loaded.state_dict(), model.state_dict(), bitwise=True)


def test_latest_skips_torn_and_corrupt_checkpoints(tmp_path):
    _fit(tmp_path, "ours", 3)
    (tmp_path / "last.ckpt").rename(tmp_path / "keep")  # not a candidate any more
    shutil.move(str(tmp_path / "keep"), str(tmp_path.parent / f"{tmp_path.name}-last"))
    torn, corrupt, good = (sorted(tmp_path.glob(f"epoch={e}-*.ckpt"))[0] for e in (2, 1, 0))
    (torn / "manifest.json").unlink()
    chunk = _first_chunk_file(corrupt)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.warns(SkippedCheckpointWarning) as seen:
        assert latest(tmp_path) == str(good)
    said = " ".join(str(w.message) for w in seen)
    assert torn.name in said and corrupt.name in said and "corrupt" in said and "incomplete" in said
    assert latest(tmp_path / "nothing-here") is None


def test_bad_input_is_refused_with_typed_errors_and_nothing_is_deleted(tmp_path):
    _fit(tmp_path / "run", "ours", 1)
    ckpt = sorted((tmp_path / "run").glob("epoch=0-*.ckpt"))[0]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "weights.bin").write_bytes(b"\0" * 64)
    before = {"run": _snapshot(tmp_path / "run"), "stray": _snapshot(stray)}

    with pytest.raises(CheckpointNotFoundError, match="stray"):
        _fit(tmp_path / "new1", "ours", 2, resume=str(stray))
    with pytest.raises(CheckpointMismatchError) as e:  # another model: wider layers
        _fit(tmp_path / "new2", "ours", 2, resume=str(ckpt), width=32)
    assert str(ckpt) in str(e.value) and "body.0.weight" in str(e.value)
    assert e.value.mismatched["body.0.weight"]
    assert {"run": _snapshot(tmp_path / "run"), "stray": _snapshot(stray)} == before

    chunk = _first_chunk_file(ckpt)
    raw = bytearray(chunk.read_bytes())
    raw[8] ^= 0x01
    chunk.write_bytes(bytes(raw))
    flipped = _snapshot(tmp_path / "run")
    with pytest.raises(CorruptCheckpointError) as e:
        _fit(tmp_path / "new3", "ours", 2, resume=str(ckpt))
    assert str(ckpt) in str(e.value) and getattr(e.value, "key", None)
    assert _snapshot(tmp_path / "run") == flipped


def test_remove_checkpoint_keeps_top_k_and_refuses_foreign_directories(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    t = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_progress_bar=False,
                   plugins=[ShardckptCheckpointIO()], enable_model_summary=False,
                   callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=1, monitor="train_loss")])
    t.fit(Net(), data())
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == 1 and (tmp_path / kept[0] / "manifest.json").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "results.csv").write_text("1,2\n")
    with pytest.raises(CheckpointWriteError, match="not removing"):
        ShardckptCheckpointIO().remove_checkpoint(foreign)
    assert (foreign / "results.csv").read_text() == "1,2\n"
    ShardckptCheckpointIO().remove_checkpoint(tmp_path / "gone-already")  # absent: nothing to do


def test_async_run_end_waits_for_the_last_commit(tmp_path, monkeypatch):
    from shardckpt.io.save_target import SaveTarget

    real, writes = SaveTarget.write_items, []

    def slow(self, *args):
        time.sleep(0.3)
        writes.append(time.monotonic())
        return real(self, *args)

    monkeypatch.setattr(SaveTarget, "write_items", slow)
    model, t = _fit(tmp_path, "ours", 2, async_save=True)
    done = time.monotonic()
    assert writes and max(writes) <= done
    for ckpt in tmp_path.glob("*.ckpt"):
        assert (ckpt / "manifest.json").is_file(), ckpt
    assert_state_equal(load_checkpoint(tmp_path / "last.ckpt")["state_dict"], model.state_dict(), bitwise=True)


@pytest.mark.parametrize("which", [1, 4], ids=["an-early-save", "the-last-save"])
def test_async_failure_in_the_background_stops_the_run(tmp_path, monkeypatch, which):
    """Saves: 1 epoch 0, 2 last, 3 epoch 1, 4 last. A failed background write is
    raised by the next save (1) or by the run's end (4), never lost."""
    from shardckpt.io.save_target import SaveTarget
    from shardckpt.store import CheckpointDir
    from tests.integrations._lightning_job import arm_faults

    monkeypatch.setattr(SaveTarget, "write_items", SaveTarget.write_items)  # undone after the test
    monkeypatch.setenv("JOB_FAIL_SAVE", str(which))
    arm_faults()
    with pytest.raises(ShardckptError, match="No space left"):
        _fit(tmp_path, "ours", 2, async_save=True)
    committed = [c for c in tmp_path.glob("*.ckpt") if (c / "manifest.json").exists()]
    for ckpt in committed:
        CheckpointDir.at(str(ckpt)).read_checked()
    if which == 1:  # the run stopped at save 2, before it wrote anything
        assert committed == []
    else:  # last.ckpt still holds epoch 0's commit: the failed overwrite replaced nothing
        assert load_checkpoint(tmp_path / "last.ckpt")["epoch"] == 0


def test_sync_save_error_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    io = ShardckptCheckpointIO()
    with pytest.raises(ShardckptError) as e:
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, blocker / "x.ckpt")
    assert "file" in str(e.value)
    assert os.path.isfile(blocker)


@pytest.mark.s3
def test_checkpoints_on_s3_resume_from_the_newest_valid(s3_bucket, monkeypatch):
    """ModelCheckpoint's directory on S3 (moto on loopback): Lightning's own listing
    goes through fsspec with the environment's endpoint, ours through storage_options."""
    for k, v in s3_bucket.endpoint.env().items():
        monkeypatch.setenv(k, v)
    opts = s3_bucket.storage_options
    root = s3_bucket.url("run")
    pl.seed_everything(0, workers=True)
    from lightning.pytorch.callbacks import ModelCheckpoint

    t = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                   plugins=[ShardckptCheckpointIO(storage_options=opts)], enable_model_summary=False,
                   callbacks=[ModelCheckpoint(dirpath=root, save_top_k=-1, save_last=True)])
    model = Net()
    t.fit(model, data())
    newest = latest(root, storage_options=opts)
    assert newest is not None and newest.rstrip("/").endswith("last.ckpt")
    got = load_checkpoint(newest, storage_options=opts)
    assert got["global_step"] == 24
    assert_state_equal(got["state_dict"], model.state_dict(), bitwise=True)


def test_the_standalone_pytorch_lightning_package_takes_the_plugin_too(tmp_path):
    """``pytorch_lightning`` ships its own copy of every class; its Trainer checks
    plugins against its own ``CheckpointIO``."""
    ptl = pytest.importorskip("pytorch_lightning")
    from torch import nn

    class Small(ptl.LightningModule):
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.layer = nn.Linear(width, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=8)

    def fit(epochs: int, model: ptl.LightningModule) -> ptl.Trainer:
        t = ptl.Trainer(plugins=[ShardckptCheckpointIO()], accelerator="cpu", logger=False, max_epochs=epochs,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ptl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        t.fit(model, loader, ckpt_path=latest(tmp_path))
        return t

    assert fit(1, Small()).global_step == 4
    assert fit(2, Small()).global_step == 8  # resumed at step 4
    with pytest.raises(CheckpointMismatchError, match="layer.weight"):  # the fit check finds ptl's strategy
        fit(3, Small(width=5))
