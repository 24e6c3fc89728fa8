"""shardckpt inside Hugging Face Transformers' ``Trainer``: replace ``Trainer(`` by
``ShardckptTrainer(`` and every ``checkpoint-<step>`` directory becomes one
shardckpt checkpoint (manifest committed last, every chunk checksummed, resumable
at another number of processes, async saves, any backend), and
``resume_from_checkpoint=True`` resumes from the newest checkpoint that verifies.

>>> from shardckpt.transformers import ShardckptTrainer
>>> trainer = ShardckptTrainer(model=model, args=args, train_dataset=ds)   # was Trainer(
>>> trainer.train(resume_from_checkpoint=True)

An entry point: may import ``shardckpt.integrations``, ``api``, ``state`` and
everything below them; never another trainer's integration.
"""

from __future__ import annotations

try:  # the trainer is an optional extra: say how to get it, not a bare ModuleNotFoundError
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError(
        'shardckpt.transformers needs Hugging Face Transformers 5.x: pip install "shardckpt[transformers]"'
    ) from e

from .checkpoints import CHECKPOINT_PATTERN, FORMAT, checkpoints_newest_first, latest
from .trainer import ShardckptTrainer

__all__ = ["ShardckptTrainer", "latest", "checkpoints_newest_first", "CHECKPOINT_PATTERN", "FORMAT"]
