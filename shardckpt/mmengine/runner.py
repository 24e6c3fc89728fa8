"""``ShardckptRunner``: MMEngine's ``Runner`` that resumes from the newest *valid*
checkpoint, loads shardckpt checkpoints (and MMEngine ``.pth`` files, weights-only)
at any number of processes, and runs ``launcher="pytorch"`` on CPU builds too.

What MMEngine's ``Runner`` does instead, and why it is replaced here:

- ``resume=True`` trusts ``work_dir/last_checkpoint``, which names the checkpoint
  being written when a kill came: ``load_or_resume`` asks ``checkpoints.latest``.
- ``load_checkpoint`` uses ``torch.load`` with torch's default, which refuses
  MMEngine's own ``HistoryBuffer`` since torch 2.6: ``checkpoints.read`` loads ours
  (CRC32C-checked) or a ``.pth`` with only MMEngine's plain-data classes allowed.
- a resume loads into a model that must fit: a checkpoint of another model raises
  ``CheckpointMismatchError`` naming path and key, before any data is read (MMEngine
  only logs shape mismatches).
- ``launcher="pytorch"`` calls ``torch.cuda.set_device`` and passes ``device_ids`` to
  DDP: without CUDA the process group is started with gloo here and DDP gets none.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from mmengine.dist import is_distributed
from mmengine.model import (
    MMDistributedDataParallel,
    convert_sync_batchnorm,
    is_model_wrapper,
    revert_sync_batchnorm,
)
from mmengine.registry import RUNNERS
from mmengine.runner import Runner, find_latest_checkpoint
from mmengine.runner.checkpoint import load_state_dict

from . import checkpoints, contents
from .hook import ShardckptCheckpointHook

__all__ = ["ShardckptRunner"]

_MODULE_PREFIX = [(r"^module\.", "")]


@RUNNERS.register_module()
class ShardckptRunner(Runner):
    """``Runner`` with shardckpt checkpoints. Select it in a config with
    ``runner_type = "ShardckptRunner"`` (after ``custom_imports`` of ``shardckpt.mmengine``).
    ``save_checkpoint`` writes a shardckpt checkpoint (collective: every rank calls it),
    so MMEngine's own ``CheckpointHook`` with this runner writes them too."""

    # ------------------------------------------------------------------ environment

    def setup_env(self, env_cfg: dict) -> None:
        if self.distributed and not is_distributed() and self.launcher == "pytorch" and not torch.cuda.is_available():
            # MMEngine's init_dist would call torch.cuda.set_device: a CPU build has no CUDA
            dist_cfg = dict(env_cfg.get("dist_cfg", {}))
            backend = dist_cfg.pop("backend", "gloo")
            dist.init_process_group(backend="gloo" if backend == "nccl" else backend)
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg: dict | None, model: torch.nn.Module) -> Any:
        if not self.distributed or torch.cuda.is_available() or model_wrapper_cfg is not None \
                or is_model_wrapper(model):
            return super().wrap_model(model_wrapper_cfg, model)
        # CPU DDP: MMEngine's default wrapper with device_ids=None (it passes LOCAL_RANK)
        model = model.to("cpu")
        sync_bn = self.cfg.get("sync_bn", None)
        model = convert_sync_batchnorm(model, sync_bn) if sync_bn is not None else revert_sync_batchnorm(model)
        return MMDistributedDataParallel(module=model, device_ids=None, broadcast_buffers=False,
                                         find_unused_parameters=self.cfg.get("find_unused_parameters", False))

    # ------------------------------------------------------------------ checkpoints

    @property
    def storage_options(self) -> dict | None:
        """The ``ShardckptCheckpointHook``'s storage options, if there is one."""
        for hook in self.hooks:
            if isinstance(hook, ShardckptCheckpointHook):
                return hook.storage_options
        return None

    def save_checkpoint(self, out_dir: str, filename: str, file_client_args: dict | None = None,
                        save_optimizer: bool = True, save_param_scheduler: bool = True,
                        meta: dict | None = None, by_epoch: bool = True, backend_args: dict | None = None) -> None:
        """A shardckpt checkpoint at ``out_dir/filename`` (MMEngine's checkpoint contents).
        Collective: every rank calls it (MMEngine's is rank 0 only)."""
        options = backend_args if backend_args is not None else file_client_args
        checkpoints.save(self, out_dir, filename, save_optimizer=save_optimizer,
                         save_param_scheduler=save_param_scheduler, meta=meta, by_epoch=by_epoch,
                         storage_options=options if options is not None else self.storage_options)

    def load_checkpoint(self, filename: str, map_location: Any = "cpu", strict: bool = False,
                        revise_keys: list = _MODULE_PREFIX) -> dict:
        """Load the weights of ``filename`` (a shardckpt checkpoint or an MMEngine ``.pth``,
        weights-only) into the model; returns the checkpoint dict. A shape that does not
        fit (any key; with ``strict`` or when resuming, any key on one side only) raises
        ``CheckpointMismatchError`` naming the path and key."""
        del map_location  # tensors are read to the CPU; load_state_dict copies them to the model's device
        resuming = bool(getattr(self, "_shardckpt_resuming", False))
        checkpoint = checkpoints.read(filename, self.model, strict=strict or resuming, revise_keys=revise_keys,
                                      storage_options=self.storage_options, with_optimizer=resuming)
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        state = checkpoint["state_dict"]
        names = contents.revised(list(state), revise_keys)
        load_state_dict(self.model.module if is_model_wrapper(self.model) else self.model,
                        type(state)((names[k], v) for k, v in state.items()), strict=strict, logger=self.logger)
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint

    def resume(self, filename: str, resume_optimizer: bool = True, resume_param_scheduler: bool = True,
               map_location: Any = "default") -> None:
        """MMEngine's ``resume`` over ``load_checkpoint`` above: the model must fit exactly."""
        self._shardckpt_resuming = True
        try:
            super().resume(filename, resume_optimizer, resume_param_scheduler, map_location)
        finally:
            self._shardckpt_resuming = False

    def load_or_resume(self) -> None:
        """``resume=True`` without ``load_from``: the newest checkpoint under ``work_dir``
        that verifies (torn and corrupt ones skipped with a ``SkippedCheckpointWarning``);
        with none, MMEngine's ``last_checkpoint`` if it names a ``.pth`` file."""
        if self._has_loaded:
            return None
        if self._resume and self._load_from is None:
            found = checkpoints.latest(self.work_dir, self.storage_options)
            if found is None:
                legacy = find_latest_checkpoint(self.work_dir)
                found = legacy if legacy is not None and not checkpoints.is_ours(legacy) else None
            self.logger.info(f"Auto resumed from the newest valid checkpoint {found}.")
            if found is not None:
                self.resume(found)
            return None
        return super().load_or_resume()

