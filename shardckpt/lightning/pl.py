"""The Lightning names the integration builds on, from ``lightning.pytorch`` (the
``lightning`` package) or else ``pytorch_lightning`` (the standalone one): both 2.x
ship the same classes, and a user has one or the other installed."""

from __future__ import annotations

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.core.saving import _load_state as load_state
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError:  # pragma: no cover - exercised where only pytorch_lightning is installed
    try:
        from pytorch_lightning import LightningModule, Trainer  # type: ignore[no-redef]
        from pytorch_lightning.core.saving import _load_state as load_state  # type: ignore[no-redef]
        from pytorch_lightning.plugins.io import CheckpointIO  # type: ignore[no-redef]
        from pytorch_lightning.strategies import (  # type: ignore[no-redef]
            FSDPStrategy,
            ModelParallelStrategy,
            Strategy,
        )
        from pytorch_lightning.trainer.states import TrainerFn  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError('shardckpt.lightning needs Lightning 2.x: pip install "shardckpt[lightning]" '
                          f"(or pytorch_lightning): {e}") from e

__all__ = ["LightningModule", "Trainer", "CheckpointIO", "FSDPStrategy", "ModelParallelStrategy", "Strategy",
           "TrainerFn", "load_state"]
