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
           "TrainerFn", "load_state", "CHECKPOINT_IO_BASES", "STRATEGY_BASES"]


def _both(attr_path: tuple[str, str], first: type) -> tuple[type, ...]:
    """``first`` and, where the other Lightning package is installed too, its class of
    the same name (``lightning.pytorch`` and ``pytorch_lightning`` ship separate copies)."""
    import importlib

    out = [first]
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            other = getattr(importlib.import_module(f"{package}.{attr_path[0]}"), attr_path[1])
        except (ImportError, AttributeError):
            continue
        if other not in out:
            out.append(other)
    return tuple(out)


#: The ``CheckpointIO`` ABCs of every installed Lightning package: the plugin registers
#: with each, so either package's Trainer accepts it.
CHECKPOINT_IO_BASES = _both(("plugins.io", "CheckpointIO"), CheckpointIO)
#: Every installed package's ``Strategy``: whichever one calls the plugin.
STRATEGY_BASES = _both(("strategies", "Strategy"), Strategy)
