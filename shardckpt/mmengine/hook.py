"""``ShardckptCheckpointHook``: MMEngine's ``CheckpointHook`` (every argument, the same
schedule, ``max_keep_ckpts``, ``save_best``, ``last_checkpoint``) writing each
checkpoint as a shardckpt checkpoint directory (``epoch_N`` / ``iter_N`` /
``best_<key>_<name>``).

MMEngine's hook calls ``runner.save_checkpoint`` and removes old checkpoints through
its file backend; here the runner the parent class sees saves through shardckpt
(``_SavesHere``, so the hook works with a plain ``Runner`` too) and the file backend
removes a checkpoint by un-committing it first (``_Backend``: a kill mid-removal
leaves a torn checkpoint that resume skips, never a committed one missing chunks).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Mapping
from typing import Any

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..store import CheckpointDir
from . import checkpoints

__all__ = ["ShardckptCheckpointHook"]


class _Backend:
    """The part of MMEngine's file backend ``CheckpointHook`` uses, over shardckpt storage."""

    def __init__(self, storage_options: Mapping[str, Any] | None) -> None:
        self.storage_options = storage_options

    def join_path(self, base: str, *parts: str) -> str:
        for part in parts:
            base = checkpoints.join(base, part)
        return base

    def isfile(self, path: str) -> bool:
        # MMEngine's own .pth of the same name (a run that switched): left alone
        return False

    def isdir(self, path: str) -> bool:
        return checkpoints.is_ours(path, self.storage_options)

    def rmtree(self, path: str) -> None:
        CheckpointDir.at(path, self.storage_options).delete()

    def remove(self, path: str) -> None:
        self.rmtree(path)


class _SavesHere:
    """``runner`` as ``CheckpointHook`` sees it, with ``save_checkpoint`` saving through shardckpt."""

    def __init__(self, runner: Any, hook: ShardckptCheckpointHook) -> None:
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "_hook", hook)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._runner, name, value)

    def save_checkpoint(self, out_dir: str, filename: str, file_client_args: Any = None, *,
                        save_optimizer: bool = True, save_param_scheduler: bool = True,
                        meta: dict[str, Any] | None = None, by_epoch: bool = True, backend_args: Any = None,
                        **kwargs: Any) -> None:
        del file_client_args, backend_args, kwargs  # mapped to storage_options in the hook
        hook = self._hook
        checkpoints.save(self._runner, out_dir, filename, save_optimizer=save_optimizer,
                         save_param_scheduler=save_param_scheduler, meta=meta, by_epoch=by_epoch,
                         storage_options=hook.storage_options, compression=hook.compression)


@HOOKS.register_module()
class ShardckptCheckpointHook(CheckpointHook):
    """MMEngine's ``CheckpointHook`` writing shardckpt checkpoints.

    Takes every ``CheckpointHook`` argument. ``backend_args`` / ``file_client_args``
    become shardckpt's ``storage_options`` (fsspec options for ``s3://`` and other
    URLs); ``compression`` is shardckpt's (``"auto"``, ``None``, ``"zstd"``).
    ``filename_tmpl`` defaults to ``epoch_{}`` / ``iter_{}`` (directories, no ``.pth``).
    ``published_keys``: publishing strips keys from a ``.pth``; use
    ``shardckpt convert`` on a checkpoint instead (a warning says so).

    >>> default_hooks = dict(checkpoint=dict(type="ShardckptCheckpointHook", interval=1000,
    ...                                      by_epoch=False, max_keep_ckpts=3))
    """

    def __init__(self, *args: Any, backend_args: dict | None = None, file_client_args: dict | None = None,
                 filename_tmpl: str | None = None, compression: Any = "auto", **kwargs: Any) -> None:
        by_epoch = kwargs.get("by_epoch", args[1] if len(args) > 1 else True)
        if filename_tmpl is None:
            filename_tmpl = "epoch_{}" if by_epoch else "iter_{}"
        super().__init__(*args, filename_tmpl=filename_tmpl, **kwargs)
        if backend_args is not None and file_client_args is not None:
            raise ValueError('"file_client_args" and "backend_args" cannot be set at the same time.')
        self.storage_options = backend_args if backend_args is not None else file_client_args
        self.compression = compression
        if self.published_keys is not None:
            print_log("ShardckptCheckpointHook: published_keys is ignored (publishing rewrites a .pth); "
                      "export the weights with `shardckpt convert CKPT out.safetensors --only state_dict`",
                      logger="current", level=logging.WARNING)
            self.published_keys = None

    def before_train(self, runner: Any) -> None:
        """MMEngine's ``before_train`` over shardckpt storage: the output directory, the
        best checkpoints and the kept checkpoints recorded in the message hub."""
        if self.out_dir is None:
            self.out_dir = runner.work_dir
        self.file_backend = self.file_client = _Backend(self.storage_options)
        if self.out_dir != runner.work_dir:
            basename = os.path.basename(runner.work_dir.rstrip(os.sep))
            self.out_dir = self.file_backend.join_path(os.fspath(self.out_dir), basename)
        runner.logger.info(f"Checkpoints will be saved to {self.out_dir} (shardckpt).")
        if self.save_best is not None:
            info = runner.message_hub.runtime_info
            if len(self.key_indicators) == 1:
                self.best_ckpt_path = info.get("best_ckpt")
            else:
                for key in self.key_indicators:
                    self.best_ckpt_path_dict[key] = info.get(f"best_ckpt_{key}")
        if self.max_keep_ckpts > 0:
            keep = list(runner.message_hub.runtime_info.get("keep_ckpt_ids", []))
            while len(keep) > self.max_keep_ckpts:
                step = keep.pop(0)
                path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(step))
                if is_main_process() and self.file_backend.isdir(path):
                    self.file_backend.rmtree(path)
            self.keep_ckpt_ids = deque(keep, self.max_keep_ckpts)

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict[str, Any]) -> None:
        super()._save_checkpoint_with_step(_SavesHere(runner, self), step, meta)

    def _save_best_checkpoint(self, runner: Any, metrics: dict[str, Any]) -> None:
        super()._save_best_checkpoint(_SavesHere(runner, self), metrics)
