"""``ShardckptCheckpointManager``: torchtitan's ``CheckpointManager`` with its DCP
calls replaced. torchtitan keeps deciding when to save (``interval``,
``enable_first_step_checkpoint``, the last step with ``last_save_model_only`` /
``export_dtype``), what to load (``load_step``, ``exclude_from_loading``,
``initial_load_path`` / ``initial_load_model_only``) and its async bookkeeping;
the overrides change only how a checkpoint is written, found and pruned:

- ``dcp_save``: one shardckpt checkpoint per ``step-N`` directory; ``async`` and
  ``async_with_pinned_mem`` return once staged (shardckpt's own staging buffers
  and gloo group), as the ``Future`` / ``AsyncSaveResponse`` torchtitan expects.
- ``dcp_load``: the model-fit check from the manifest, then every chunk checked
  while loading into the live (DTensor) tensors, resharding. A DCP ``step-N``
  (a run started before the switch) and HF safetensors still load through DCP.
- ``_find_load_step``: the newest ``step-N`` that verifies (a kill mid-save
  leaves a torn one that torchtitan's ``.metadata`` test cannot tell from a
  good one when the writer is not DCP), skipping with a warning.
- ``_purge_stale_checkpoints``: ``keep_latest_k`` counts committed checkpoints,
  so a torn or in-flight newest one never costs the last good one.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torchtitan.components.checkpointer import AsyncMode, CheckpointManager
from torchtitan.tools import filesystem
from torchtitan.tools.utils import GarbageCollection

from ..engine.async_save import AsyncSaveHandle
from ..errors import CheckpointNotFoundError
from ..integrations import children, is_checkpoint_dir, newest_valid, numbered, save_tree
from ..store import UNUSABLE, CheckpointDir
from . import contents

__all__ = ["ShardckptCheckpointManager", "shardckpt_config", "use_shardckpt", "STEP_PATTERN"]

#: torchtitan's checkpoint directory names under ``checkpoint.folder``.
STEP_PATTERN = r"step-(\d+)"


def _is_dcp(path: str) -> bool:
    return filesystem.isfile(filesystem.join(path, ".metadata")) or filesystem.isfile(
        filesystem.join(path, "model.safetensors.index.json"))


def _future(handle: AsyncSaveHandle | None) -> Future:
    """A ``concurrent.futures.Future`` (what torchtitan waits on) for a background save."""
    fut: Future = Future()
    if handle is None:  # this rank staged nothing to wait for
        fut.set_result(None)
        return fut

    def wait() -> None:
        try:
            handle.result()
        except BaseException as e:  # re-raised by torchtitan's maybe_wait_for_saving
            fut.set_exception(e)
        else:
            fut.set_result(None)

    threading.Thread(target=wait, name="shardckpt-torchtitan-save", daemon=True).start()
    return fut


class ShardckptCheckpointManager(CheckpointManager):
    """torchtitan's checkpoint manager writing shardckpt checkpoints (see the module doc)."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        """``CheckpointManager.Config`` unchanged: every ``checkpoint.*`` option keeps its meaning."""

    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, async_mode: AsyncMode,
                 enable_garbage_collection: bool = False, to_hf: bool = False
                 ) -> Future | AsyncSaveResponse | None:
        if to_hf:  # a final HF safetensors export is an export, not a checkpoint: torchtitan's writer
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        tree = contents.collect(state_dict)
        ret: Future | AsyncSaveResponse | None = None
        # overwrite: DCP rewrites a step-N it is told to, e.g. after resuming from an older load_step
        if async_mode == AsyncMode.DISABLED:
            save_tree(tree, checkpoint_id, overwrite=True)
        else:
            fut = _future(save_tree(tree, checkpoint_id, overwrite=True, background=True))
            if async_mode == AsyncMode.ASYNC:
                ret = fut
            else:
                staged: Future = Future()
                staged.set_result(None)  # save_tree returned: this rank's state is already copied out
                ret = AsyncSaveResponse(staging_completion=staged, upload_completion=fut)
        if enable_garbage_collection:
            GarbageCollection.collect("GC collection invoked by checkpointer.")
        return ret

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool,
                 from_quantized: bool) -> None:
        if from_hf or (not is_checkpoint_dir(checkpoint_id) and _is_dcp(checkpoint_id)):
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        contents.restore(state_dict, checkpoint_id)
        # as torchtitan does after dcp.load: the wrapper refreshes its cached state_dict
        if "model" in self.states:
            self.states["model"].load_state_dict(state_dict)
        return None

    def _find_load_step(self, folder: str = "") -> int:
        folder = folder or self.folder
        for url in numbered(children(folder), STEP_PATTERN):
            step = int(os.path.basename(url.rstrip("/")).split("-")[1])
            if is_checkpoint_dir(url):
                # collective: every rank walks the same directories and gets the same answer
                if newest_valid([url]) is not None:
                    return step
            elif _is_dcp(url):
                return step
        return -1

    def _committed(self, url: str) -> bool:
        try:
            CheckpointDir.at(url).read_manifest()
        except CheckpointNotFoundError:
            return _is_dcp(url)
        except UNUSABLE:
            return False
        return True

    def _purge_stale_checkpoints(self) -> None:
        if not self._should_purge():
            return
        steps = numbered(children(self.folder), STEP_PATTERN)  # newest first
        committed = [u for u in steps if self._committed(u)]
        if len(committed) <= self.keep_latest_k:
            return
        oldest_kept = committed[self.keep_latest_k - 1]
        for url in steps[steps.index(oldest_kept) + 1:]:
            if is_checkpoint_dir(url):
                # ours: un-commit first (manifest, then data), so a kill mid-delete leaves
                # a torn directory resume skips, never a half-deleted "valid" one
                CheckpointDir.at(url).delete()
            else:  # the queue and its thread exist whenever keep_latest_k > 0 (_should_purge)
                self.purge_queue.put(url)  # a DCP step-N from before the switch: torchtitan's rmtree

    def _close(self) -> None:
        # a background save still writing must commit before the process may exit
        if getattr(self, "save_future", None) is not None:
            self._wait_for_saving()
        super()._close()


def shardckpt_config(native: CheckpointManager.Config | None = None, **overrides: Any
                     ) -> ShardckptCheckpointManager.Config:
    """``ShardckptCheckpointManager.Config`` with every option of ``native`` (torchtitan's
    ``CheckpointManager.Config``, defaults when None) and ``overrides`` applied."""
    values = {f.name: getattr(native, f.name) for f in dataclasses.fields(native)} if native is not None else {}
    values.update(overrides)
    return ShardckptCheckpointManager.Config(**values)


def use_shardckpt(trainer_config: Any, **overrides: Any) -> Any:
    """``trainer_config`` (a torchtitan ``Trainer.Config``) with its ``checkpoint``
    replaced by the shardckpt manager's config, every option kept; returned for
    use as a ``--config`` function's result."""
    trainer_config.checkpoint = shardckpt_config(trainer_config.checkpoint, **overrides)
    return trainer_config
