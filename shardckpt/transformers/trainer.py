"""``ShardckptTrainer``: Transformers' ``Trainer`` whose checkpoints are shardckpt
checkpoints. The seams it takes over, in the order a run meets them:

1. ``train(resume_from_checkpoint=...)`` [all]: ``True`` picks the newest
   ``checkpoint-<step>`` that verifies (``checkpoints.latest``: collective,
   torn and corrupt ones skipped with a warning); a path is opened and its
   manifest checked. A native Trainer checkpoint is handed to Trainer's own code.
2. ``_inner_training_loop`` [all]: before Trainer prepares the model, the model
   fit is checked from the manifest (``CheckpointMismatchError`` naming path and
   key, before any data is read) and the whole checkpoint loaded once, every
   chunk's CRC checked, the weights straight into the model's tensors.
   (FSDP: after preparation, in ``_load_from_checkpoint``, resharding DTensors.)
3. ``_init_training_state``, ``_load_optimizer_and_scheduler``, ``_load_scaler``,
   ``_load_rng_state`` [all]: each puts its part of that one loaded checkpoint back.
4. ``_save_checkpoint`` [all]: one collective ``save_tree`` per checkpoint
   (``async_save=True``: returns once staged; the next save, the run's end and
   ``load_best_model_at_end`` wait for the commit and re-raise its failure),
   then retention on rank 0 (``checkpoints.rotate``).
5. ``_finalize_training`` [all]: waits for the last commit before Trainer's end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from transformers import Trainer
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    SaveStrategy,
    compare_trainer_and_checkpoint_args,
)

from ..engine.async_save import AsyncSaveHandle
from ..errors import CheckpointNotFoundError, UnsupportedFormatError
from ..format.manifest import Manifest
from ..integrations import check_state_dict, load_tree, read_manifest, save_tree, skeleton_of
from . import contents
from .checkpoints import FORMAT, is_native, latest, rotate

__all__ = ["ShardckptTrainer"]

log = logging.getLogger(__name__)


class _Resume:
    """The checkpoint this run resumes from: its manifest (read once) and, once
    loaded, its tree."""

    def __init__(self, path: str, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.tree: dict[str, Any] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.metadata[contents.META_KEY]


class ShardckptTrainer(Trainer):
    """A drop-in ``transformers.Trainer`` (replace ``Trainer(`` by ``ShardckptTrainer(``)
    whose ``checkpoint-<step>`` directories are shardckpt checkpoints.

    Extra keyword arguments: ``storage_options`` (for the output directory's
    backend, e.g. S3 credentials), ``async_save`` (return from a checkpoint once
    it is staged; the write and commit run in the background), ``compression``
    (as ``shardckpt.save``). Everything else is Trainer's.

    >>> trainer = ShardckptTrainer(model=model, args=args, train_dataset=ds, async_save=True)
    >>> trainer.train(resume_from_checkpoint=True)   # the newest checkpoint that verifies
    """

    def __init__(self, *args: Any, storage_options: Mapping[str, Any] | None = None, async_save: bool = False,
                 compression: Any = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError("ShardckptTrainer does not write DeepSpeed checkpoints (DeepSpeed saves its own "
                             "engine state); use transformers.Trainer for DeepSpeed runs")
        self.storage_options = dict(storage_options) if storage_options else None
        self.async_save = bool(async_save)
        self.compression = compression
        self._sc_resume: _Resume | None = None
        self._sc_pending: tuple[AsyncSaveHandle | None, str] | None = None
        self._sc_resumed_step: int | None = None
        #: The shardckpt checkpoint the last ``train()`` resumed from (None: none).
        self.resumed_from: str | None = None

    # -- 1. where to resume from

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        """Trainer's ``train``; ``resume_from_checkpoint=True`` means the newest
        checkpoint under ``output_dir`` that verifies (``CheckpointNotFoundError``
        if there is none)."""
        path = self._resolve(resume_from_checkpoint)
        self._sc_resume = None
        self._sc_resumed_step = None
        self.resumed_from = None
        if path is not None and not is_native(path):
            self._sc_resume = self._open(path)
            self.resumed_from = path
            self._sc_resumed_step = int(self._sc_resume.meta["global_step"])
            state = contents.trainer_state_from_json(self._sc_resume.meta["trainer_state"])
            if state.train_batch_size is not None and self.args.auto_find_batch_size:
                self._train_batch_size = state.train_batch_size
            path = None  # Trainer's own resume code reads files ours do not have
        try:
            return super().train(resume_from_checkpoint=path, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        except BaseException:
            self._settle_after_failure()
            raise
        finally:
            self._sc_resume = None  # the loaded tensors are not kept past the run

    def _resolve(self, resume_from_checkpoint: str | bool | None) -> str | None:
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            found = latest(self.args.output_dir, self.storage_options)
            if found is None:
                raise CheckpointNotFoundError(
                    f"no complete, valid shardckpt checkpoint under {self.args.output_dir} to resume from",
                    path=str(self.args.output_dir))
            return found
        return os.fspath(resume_from_checkpoint)

    def _open(self, path: str) -> _Resume:
        """The manifest of ``path`` (typed errors: not a checkpoint, torn, damaged,
        written by something else than this integration)."""
        manifest = read_manifest(path, self.storage_options)
        skeleton_of(manifest, path)
        meta = manifest.metadata.get(contents.META_KEY)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UnsupportedFormatError(f"{path} is a shardckpt checkpoint but not one ShardckptTrainer wrote "
                                         f"(metadata {contents.META_KEY!r} missing or of another format)",
                                         path=path, key=contents.META_KEY)
        return _Resume(path, manifest)

    # -- 2. loading the checkpoint once

    def _inner_training_loop(self, batch_size: int | None = None, args: Any = None,
                             resume_from_checkpoint: str | None = None, trial: Any = None,
                             ignore_keys_for_eval: list[str] | None = None) -> Any:
        r = self._sc_resume
        if r is not None:
            resume_from_checkpoint = r.path
            if not contents.is_sharded(self):  # FSDP loads after preparation (_load_from_checkpoint)
                self._load_resume(r, with_optimizer=False)
        return super()._inner_training_loop(batch_size=batch_size, args=args,
                                            resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                            ignore_keys_for_eval=ignore_keys_for_eval)

    def _load_resume(self, r: _Resume, with_optimizer: bool) -> dict[str, Any]:
        if r.tree is None:
            live = contents.live_targets(self, with_optimizer)
            check_state_dict(r.manifest, r.path, ("model",), live["model"])
            r.tree = load_tree(r.path, storage_options=self.storage_options, live=live, manifest=r.manifest)
        return r.tree

    def _ours(self, checkpoint: str | None) -> _Resume | None:
        r = self._sc_resume
        return r if r is not None and checkpoint is not None and os.fspath(checkpoint) == r.path else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        r = self._ours(resume_from_checkpoint)
        if r is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        tree = self._load_resume(r, with_optimizer=True)
        if contents.is_sharded(self):
            contents.restore_sharded(self, tree)

    # -- 3. putting each part back

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: str | None, trial: Any) -> tuple[int, int]:
        r = self._ours(resume_from_checkpoint)
        if r is None:
            return super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                resume_from_checkpoint, trial)
        super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs, None, trial)
        # As Trainer does with trainer_state.json, from the manifest's checksummed copy.
        self.state = contents.trainer_state_from_json(r.meta["trainer_state"])
        best = self.state.best_model_checkpoint
        if best is not None and not os.path.isdir(best):
            log.warning("the best checkpoint %s recorded in the resumed state does not exist anymore", best)
            self.state.best_model_checkpoint = None
        compare_trainer_and_checkpoint_args(self.args, self.state)
        self._load_callback_state()
        epochs_trained = int(self.state.global_step // num_update_steps_per_epoch)
        steps_in_epoch = 0
        if not self.args.ignore_data_skip:
            steps_in_epoch = (self.state.global_step % num_update_steps_per_epoch) * self.args.gradient_accumulation_steps
        self.state.init_training_references(self, max_steps, num_train_epochs, trial)
        return epochs_trained, steps_in_epoch

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        r = self._ours(checkpoint)
        if r is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        tree = self._load_resume(r, with_optimizer=True)
        if tree.get("optimizer") is not None and not contents.is_sharded(self):
            self.optimizer.load_state_dict(tree["optimizer"])
        if tree.get("scheduler") is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(tree["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        r = self._ours(checkpoint)
        if r is None:
            super()._load_scaler(checkpoint)
            return
        scaler = getattr(self.accelerator, "scaler", None)
        stored = self._load_resume(r, with_optimizer=True).get("scaler")
        if scaler is not None and stored is not None:
            scaler.load_state_dict(stored)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        r = self._ours(checkpoint)
        if r is None:
            super()._load_rng_state(checkpoint)
            return
        contents.restore_rng(self._load_resume(r, with_optimizer=True))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or is_native(best):
            super()._load_best_model()
            return
        self.wait_for_checkpoint()
        log.info("loading best model from %s (score: %s)", best, self.state.best_metric)
        r = self._open(best)
        live = {"model": contents.model_state(self)}
        check_state_dict(r.manifest, best, ("model",), live["model"])
        tree = load_tree(best, storage_options=self.storage_options, live=live, manifest=r.manifest)
        if contents.is_sharded(self):
            contents.restore_sharded(self, {"model": tree["model"]})

    # -- 4. saving

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.wait_for_checkpoint()  # one save at a time; an earlier background failure stops the run here
        step = int(self.state.global_step)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        self._track_best(run_dir, step)
        if self.args.should_save:
            self._export_callback_states()
        meta = {contents.META_KEY: {"format": FORMAT, "global_step": step, "world_size": int(self.args.world_size),
                                    "trainer_state": contents.trainer_state_json(self)}}
        tree = contents.build_tree(self)
        # A resumed run re-saves the steps after its checkpoint: those left by the run it
        # replaces are superseded (atomically), as Trainer overwrites them. Otherwise fail closed.
        overwrite = self._sc_resumed_step is not None and step > self._sc_resumed_step
        handle = save_tree(tree, output_dir, storage_options=self.storage_options, compression=self.compression,
                           background=self.async_save, overwrite=overwrite, metadata=meta)
        if self.args.push_to_hub:
            log.warning("push_to_hub: checkpoints written by ShardckptTrainer are not pushed (save_model's are)")
        if self.async_save:
            self._sc_pending = (handle, output_dir)
        else:
            self._rotate()

    def _track_best(self, run_dir: str, step: int) -> None:
        strategies = [SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST]
        best_step = self.state.best_global_step
        if self.args.save_strategy not in strategies or not best_step:
            return
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == step or os.path.isdir(best_dir):  # this save, or one already made
            self.state.best_model_checkpoint = best_dir

    def _export_callback_states(self) -> None:
        """As Trainer does before writing trainer_state.json."""
        from transformers.trainer_callback import ExportableState

        for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()

    def _rotate(self) -> None:
        if not self.args.should_save:
            return
        pending = self._sc_pending[1] if self._sc_pending is not None else None
        for url in rotate(self.args.output_dir, self.args.save_total_limit,
                          [self.state.best_model_checkpoint, pending], self.storage_options):
            log.info("deleted checkpoint %s (save_total_limit=%s)", url, self.args.save_total_limit)

    def wait_for_checkpoint(self) -> None:
        """Wait until the checkpoint being written in the background (``async_save``)
        is committed, re-raising its failure (typed, naming ranks); then apply
        ``save_total_limit``. Returns at once when none is in flight."""
        if self._sc_pending is None:
            return
        handle, _ = self._sc_pending
        self._sc_pending = None
        if handle is not None:
            handle.result()
        if dist.is_available() and dist.is_initialized():
            # rank 0 deletes only once every rank knows the save committed
            dist.barrier()
        self._rotate()

    def _settle_after_failure(self) -> None:
        """The run failed: let a background save finish (its commit is still
        good) without hiding the run's own error behind its outcome."""
        pending, self._sc_pending = self._sc_pending, None
        if pending is not None and pending[0] is not None:
            try:
                pending[0].result()
            except Exception as e:  # noqa: BLE001 - the run's error is the one raised
                log.error("the background checkpoint %s failed too: %s", pending[1], e)

    # -- 5. the end of the run

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float) -> Any:
        self.wait_for_checkpoint()  # the last checkpoint is committed (or its failure raised) first
        return super()._finalize_training(trial, num_train_samples, start_time)
