"""A root of step checkpoints (``<root>/step_<step:010d>/``): listing with status,
retention and the owner marker, over any backend.

Listing takes no lock and writes nothing, so it is safe while a job is saving
there (a save in flight lists as ``incomplete``). Only the root's owner (rank 0
of the manager holding the owner marker) deletes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Container, Sequence

from ..backends import Storage
from ..errors import (
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from .checkpoint import CheckpointDir
from .owner import OwnerMarker
from .retention import CheckpointInfo, RetentionPolicy, steps_to_delete
from .verify import verify_dir

__all__ = ["CheckpointRoot", "step_dirname", "parse_step", "UNUSABLE", "status_of"]

log = logging.getLogger("shardckpt.manager")
_STEP_DIR = re.compile(r"^step_(\d+)$")

#: Errors that make a checkpoint unusable (as opposed to I/O trouble, which is raised).
UNUSABLE = (CorruptCheckpointError, IncompleteCheckpointError, CheckpointNotFoundError)


def step_dirname(step: int) -> str:
    """The directory name of ``step`` under a root: ``step_0000000100``."""
    return f"step_{step:010d}"


def parse_step(name: str) -> int | None:
    """The step of a directory named by ``step_dirname``, else None."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def status_of(e: BaseException) -> str:
    return "corrupt" if isinstance(e, CorruptCheckpointError) else "incomplete"


def inspect_dir(ckpt: CheckpointDir, step: int, deep: bool) -> CheckpointInfo | None:
    """Status of one checkpoint directory; None if it vanished while we looked."""
    try:
        manifest = verify_dir(ckpt).manifest if deep else ckpt.read_checked()
    except CheckpointNotFoundError:
        return None
    except UNUSABLE as e:
        return CheckpointInfo(step, ckpt.url, status_of(e), reason=str(e))  # type: ignore[arg-type]
    metrics = manifest.metadata.get("metrics")
    return CheckpointInfo(
        step, ckpt.url, "valid", size_bytes=manifest.total_bytes, created_unix=manifest.created_unix,
        metrics=dict(metrics) if isinstance(metrics, dict) else {},
    )


class CheckpointRoot:
    """The step checkpoints under ``storage``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @property
    def url(self) -> str:
        return self.storage.url

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.storage.child(step_dirname(step)))

    def step_url(self, step: int) -> str:
        return self.checkpoint(step).url

    def steps(self) -> list[int]:
        """Steps that have a directory (any status), ascending."""
        found = (parse_step(n) for n in self.storage.listdir())
        return sorted(s for s in found if s is not None)

    def list(self, deep: bool = False) -> list[CheckpointInfo]:
        """Every step checkpoint with its status, oldest first. ``deep`` verifies
        every chunk; otherwise manifest and shard sizes only (no data read)."""
        out = []
        for step in self.steps():
            info = inspect_dir(self.checkpoint(step), step, deep)
            if info is not None:
                out.append(info)
        return out

    def owner(self, take_over: bool = False) -> OwnerMarker:
        return OwnerMarker(self.storage, take_over=take_over)

    def delete(self, step: int) -> None:
        """Remove one step checkpoint (un-committed first)."""
        self.checkpoint(step).delete()

    def apply_retention(
        self,
        policies: Sequence[RetentionPolicy],
        in_flight: Collection[int] = (),
        known_bad: Container[int] = (),
        checkpoints: Sequence[CheckpointInfo] | None = None,
    ) -> list[CheckpointInfo]:
        """Delete what ``policies`` drop (never the newest valid checkpoint nor one in
        flight); return what was deleted. Failures to delete only warn: a
        checkpoint that could not be deleted costs space, not correctness.
        ``known_bad`` steps count as corrupt whatever a cheap scan says."""
        infos = list(checkpoints) if checkpoints is not None else self.list()
        infos = [CheckpointInfo(c.step, c.path, "corrupt", reason="known damaged") if c.step in known_bad
                 and c.valid else c for c in infos]
        deleted = []
        for c in steps_to_delete(infos, policies, in_flight):
            if not c.valid and c.step not in known_bad and not self._still_unusable(c.step):
                continue
            try:
                self.delete(c.step)
                deleted.append(c)
                log.info("retention: removed step %d (%s)", c.step, c.status)
            except OSError as e:
                log.warning("retention: could not remove %s: %s", c.path, e)
        return deleted

    def _still_unusable(self, step: int) -> bool:
        """Look again before deleting a checkpoint a scan found unusable: one failed or
        short read must not cost a good checkpoint (only a second look that agrees does)."""
        try:
            again = inspect_dir(self.checkpoint(step), step, deep=False)
        except (OSError, CheckpointReadError) as e:
            log.warning("retention: keeping step %d: could not look at it again: %s", step, e)
            return False
        if again is not None and again.valid:
            log.warning("retention: keeping step %d: it scanned as unusable but is valid on a second look", step)
            return False
        return True
