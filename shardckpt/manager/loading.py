"""How a manager reads its root's checkpoints together: decisions taken on rank 0
and handed to every rank, verification split over ranks, and the load of one step
into a training state. Composed into ``CheckpointManager`` (its restore logic
lives in ``checkpoint_manager``; the mechanics live here).

Every method is collective over the manager's control group unless it says not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from ..api import load
from ..collectives import Group, new_gloo_group
from ..errors import ShardckptError
from ..store import UNUSABLE, CheckpointDir, parse_step, status_of, verify_dir

__all__ = ["RootReads", "control_group", "check_step"]

log = logging.getLogger("shardckpt.manager")
T = TypeVar("T")


def control_group(pg: dist.ProcessGroup | None) -> Group:
    """The group a manager decides over: ``pg`` if it is gloo, else a gloo group of its ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group(None)
    if dist.get_backend(pg) == "gloo":
        return Group(pg)
    # Decisions are tiny CPU tensors/objects: a gloo group works whatever the
    # training backend. Collective over the default group, like the constructor.
    return Group(new_gloo_group(pg))


def check_step(step: Any) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return step


class RootReads:
    """``ctl``: the control group; ``pg``: the training group loads run over."""

    def __init__(self, ctl: Group, pg: dist.ProcessGroup | None, storage_options: dict[str, Any] | None) -> None:
        self.ctl, self.pg, self.storage_options = ctl, pg, storage_options

    def on_rank0(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result (or its error) to every rank."""
        g = self.ctl
        return g.gather_broadcast(what, lambda: fn() if g.is_coordinator else None,  # type: ignore[return-value]
                                  lambda values: values[0], ShardckptError)

    def verify(self, ckpt: CheckpointDir) -> tuple[str, str] | None:
        """Every rank checks a 1/N share of the chunks (not rank 0 all of them); the
        first problem any rank found, (status, reason), the same on every rank."""
        g = self.ctl

        def mine() -> tuple[str, str] | None:
            try:
                verify_dir(ckpt, share=(g.rank, g.world_size))
            except UNUSABLE as e:
                return status_of(e), str(e)
            return None

        return g.gather_broadcast(f"verifying {ckpt.url}", mine,
                                  lambda found: next((f for f in found if f is not None), None), ShardckptError)

    def load(self, state: Any, path: str, step: int | None) -> int | None:
        """Load the checkpoint at ``path`` into ``state`` (its chunks CRC-checked as read)."""
        # load bounds and types its collectives itself (a lost or stuck peer)
        # Stateful objects as DCP treats them: load into their state_dict, then hand it back
        stateful = callable(getattr(state, "state_dict", None)) and callable(getattr(state, "load_state_dict", None))
        sd = state.state_dict() if stateful else state
        load({"state": sd}, path, process_group=self.pg, storage_options=self.storage_options)
        if stateful:
            state.load_state_dict(sd)
        if step is not None and hasattr(state, "step"):
            state.step = step
        if self.ctl.is_coordinator:
            log.info("restored step %s from %s", step, path)
        return step

    def saved_step(self, path: str) -> int | None:
        """[not collective] The step a committed checkpoint records (its metadata, else its name)."""
        manifest = CheckpointDir.at(path, self.storage_options).read_checked()
        s = manifest.metadata.get("step")
        if isinstance(s, int) and not isinstance(s, bool):
            return s
        return parse_step(os.path.basename(path.rstrip("/")))
