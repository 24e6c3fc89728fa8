"""Rank-side worker of the Transformers integration benchmark: the time a Trainer
spends checkpointing in a short DDP run, with its native checkpoints or with
``ShardckptTrainer`` (sync and async). ``benchmarks/bench_integrations.py``
launches it with torchrun (2 processes, gloo), interleaves the variants and takes
medians; ``measure`` runs inside each process. By hand, one round:
``python benchmarks/bench_integrations.py --trainers transformers --repeats 1``.

Measured per rank with ``time.perf_counter``: the time inside Trainer's
``_save_checkpoint`` (native: model files, optimizer, scheduler, RNG and
trainer state; ours: one collective shardckpt save), plus, for async, the wait
for the last commit at the run's end (outside any save call).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

__all__ = ["measure", "VARIANTS"]

VARIANTS = ("native", "sync", "async")


class _MLP(nn.Module):
    """``depth`` square layers of ``width``: 4·width² parameters (with AdamW's two
    moments, ~48 MB of state at width 1024, ~190 MB at 2048)."""

    def __init__(self, width: int, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.layers(x), labels)}


class _Data(torch.utils.data.Dataset):
    def __init__(self, width: int, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _timed(base: type) -> type:
    """``base`` (Trainer or ShardckptTrainer) with its checkpoint time counted."""

    class Timed(base):  # type: ignore[misc, valid-type]
        checkpoint_seconds = 0.0
        _inside = False

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            t0, self._inside = time.perf_counter(), True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._inside = False
                self.checkpoint_seconds += time.perf_counter() - t0

        def wait_for_checkpoint(self) -> None:  # ShardckptTrainer only: the async commit waits
            t0 = time.perf_counter()
            super().wait_for_checkpoint()
            if not self._inside:  # a save's own wait is already inside its time
                self.checkpoint_seconds += time.perf_counter() - t0

    return Timed


def measure(variant: str, out_dir: str, steps: int, interval: int, width: int) -> float:
    """Train ``steps`` steps of a ``width``-wide MLP under DDP (torchrun's env, gloo),
    checkpointing every ``interval`` steps into ``out_dir``; the seconds this rank
    spent checkpointing. ``variant``: ``native``, ``sync`` or ``async``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, save_steps=interval, per_device_train_batch_size=8,
        logging_steps=10**6, report_to=[], use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        disable_tqdm=True, dataloader_num_workers=0, save_strategy="steps",
    )
    kw: dict[str, Any] = dict(model=_MLP(width), args=args, train_dataset=_Data(width))
    if variant == "native":
        trainer = _timed(Trainer)(**kw)
    else:
        from shardckpt.transformers import ShardckptTrainer

        trainer = _timed(ShardckptTrainer)(**kw, async_save=variant == "async")
    trainer.train()
    return float(trainer.checkpoint_seconds)
