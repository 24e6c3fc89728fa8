"""A small, deterministic Lightning run the Lightning tests start (in process or
under torchrun): a module with BatchNorm, Adam and a StepLR schedule, a
checkpoint at every epoch end, optionally resumed.

    python -m torch.distributed.run --nproc-per-node=2 tests/integrations/_lightning_job.py \
        --dir D --io ours|native [--async] --epochs N [--resume latest|last|<path>] --out params.pt

Test-only faults, armed by environment variables in the worker (our engine's own
writer is slowed or failed, never the trainer): ``JOB_HOLD_SAVE=n`` makes the
n-th save (1-based) hold its writes for a minute (the test kills the job then);
``JOB_FAIL_SAVE=n`` makes the n-th save's background write fail.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

__all__ = ["Net", "ShardedNet", "data", "trainer", "arm_faults", "main"]


class Net(pl.LightningModule):
    def __init__(self, width: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


class ShardedNet(Net):
    """Net for ModelParallelStrategy: FSDP2 over the data-parallel mesh (no BatchNorm
    statistics to shard: LayerNorm)."""

    def __init__(self, width: int = 16, lr: float = 0.01) -> None:
        super().__init__(width, lr)
        self.body = nn.Sequential(nn.Linear(8, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, 1))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.body:
            if any(p.requires_grad for p in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def data(n: int = 96) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True,
                      generator=torch.Generator().manual_seed(5))


def trainer(ckpt_dir: str, io: str, epochs: int, devices: int, async_save: bool = False, sharded: str = "",
            accelerator: str = "cpu", **kw: Any) -> pl.Trainer:
    from shardckpt.lightning import ShardckptCheckpointIO

    plugins: list[Any] = []
    strategy: Any = "ddp" if devices > 1 else "auto"
    if sharded == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from shardckpt.lightning import ShardckptFSDPStrategy

        strategy = ShardckptFSDPStrategy(async_save=async_save) if io == "ours" else FSDPStrategy(
            state_dict_type="sharded")
    elif sharded == "mp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        from shardckpt.lightning import ShardckptModelParallelStrategy

        sizes = {"data_parallel_size": devices, "tensor_parallel_size": 1}
        strategy = (ShardckptModelParallelStrategy(async_save=async_save, **sizes) if io == "ours"
                    else ModelParallelStrategy(**sizes))
    elif io == "ours":
        plugins = [ShardckptCheckpointIO(async_save=async_save)]
    return pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_epochs=epochs,
        plugins=plugins, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, save_last=True)],
        deterministic=True, **kw)


def arm_faults() -> None:
    """The environment's test faults, on our own writer (see the module docstring)."""
    from shardckpt.io.save_target import SaveTarget

    hold, fail = int(os.environ.get("JOB_HOLD_SAVE", "0")), int(os.environ.get("JOB_FAIL_SAVE", "0"))
    if not (hold or fail):
        return
    real, seen = SaveTarget.write_items, {"saves": 0, "target": None}

    def write_items(self: Any, *args: Any) -> Any:
        if seen["target"] is not self:  # the first write call of a new save
            seen["target"], seen["saves"] = self, seen["saves"] + 1
        if seen["saves"] == hold:
            time.sleep(60)
        if seen["saves"] == fail:
            raise OSError(28, "No space left on device (injected by the test)")
        return real(self, *args)

    SaveTarget.write_items = write_items  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--io", choices=("ours", "native"), default="ours")
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--resume", default=None)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--out", default=None)
    p.add_argument("--sharded", choices=("", "fsdp", "mp"), default="")
    p.add_argument("--accelerator", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    arm_faults()
    pl.seed_everything(0, workers=True)
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    t = trainer(a.dir, a.io, a.epochs, devices, a.async_save, a.sharded, a.accelerator)
    ckpt_path = a.resume
    if a.resume == "latest":
        from shardckpt.lightning import latest

        ckpt_path = latest(a.dir)
    model = ShardedNet(a.width) if a.sharded == "mp" else Net(a.width)
    t.fit(model, data(), ckpt_path=ckpt_path)
    params = model.state_dict()
    if a.sharded:  # the whole parameters, gathered (collective)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        params = get_model_state_dict(t.strategy.model, options=StateDictOptions(full_state_dict=True))
    if a.out and t.is_global_zero:
        torch.save({"params": {k: v.detach().clone() for k, v in params.items()},
                    "global_step": t.global_step, "resumed_from": ckpt_path}, a.out)
    if torch.distributed.is_initialized():  # as a torchrun script should: gloo's threads end here, not in exit
        torch.distributed.destroy_process_group()
    # Skip interpreter finalization, as tests/multiproc.py does: C++ static destructors
    # racing library threads ("terminate called without an active exception", seen
    # once in ~20 FSDP2 runs after fit had returned and the results were written)
    # are not what these tests are about.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
