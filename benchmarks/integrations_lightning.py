"""Lightning's side of ``bench_integrations.py``: a short DDP run with a checkpoint
every ``interval`` steps, timed inside the trainer's own save calls.

Runs in each torchrun rank. ``native``: Lightning's ``TorchCheckpointIO``
(``torch.save`` of the whole dict on rank 0); ``sync`` / ``async``:
``ShardckptCheckpointIO``. Timed: every ``ModelCheckpoint`` save (the call
``trainer.save_checkpoint`` makes, including the barrier the other ranks wait
in) plus, for ``async``, the run's end waiting for the last commit.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["measure", "BATCH"]

BATCH = 64


def measure(variant: str, out_dir: str, steps: int, interval: int, width: int) -> float:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from shardckpt.lightning import ShardckptCheckpointIO

    spent = [0.0]

    class TimedCheckpoint(ModelCheckpoint):
        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            t0 = time.perf_counter()
            super()._save_checkpoint(trainer, filepath)
            spent[0] += time.perf_counter() - t0

    class TimedIO(ShardckptCheckpointIO):
        def teardown(self) -> None:  # the run's end: waits for the last commit
            t0 = time.perf_counter()
            super().teardown()
            spent[0] += time.perf_counter() - t0

    class Mlp(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(4)))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    pl.seed_everything(0)
    plugins = [] if variant == "native" else [TimedIO(async_save=variant == "async")]
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
        plugins=plugins, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[TimedCheckpoint(dirpath=out_dir, every_n_train_steps=interval, save_top_k=-1)])
    # batches big enough that a step computes for a while: what an async save overlaps with
    x = torch.randn(steps * BATCH * devices, width)
    trainer.fit(Mlp(), DataLoader(TensorDataset(x), batch_size=BATCH))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return spent[0]
