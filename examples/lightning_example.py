"""PyTorch Lightning with shardckpt: one plugin in the Trainer, one call to resume.

    python examples/lightning_example.py --dir ckpts/lightning                # one process
    torchrun --nproc-per-node=2 examples/lightning_example.py --dir ckpts/lightning   # DDP

Run it again (at any number of processes) and it resumes from the newest valid
checkpoint in ``--dir``: a checkpoint a crash left half-written is skipped with
a warning naming it. ``--async`` saves in the background.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardckpt.lightning import ShardckptCheckpointIO, latest


class Regressor(pl.LightningModule):
    def __init__(self, width: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="ckpts/lightning")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--async", dest="async_save", action="store_true")
    a = p.parse_args()
    pl.seed_everything(0)
    x = torch.randn(512, 16)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32, shuffle=True)
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=a.epochs,
        plugins=[ShardckptCheckpointIO(async_save=a.async_save)],                  # <- the one line
        callbacks=[ModelCheckpoint(dirpath=a.dir, save_top_k=2, monitor="loss", save_last=True)],
        logger=False, enable_progress_bar=False,
    )
    trainer.fit(Regressor(), loader, ckpt_path=latest(a.dir))                       # <- resume (None: fresh)
    if trainer.is_global_zero:
        print(f"finished at epoch {trainer.current_epoch}, step {trainer.global_step}; checkpoints in {a.dir}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
