"""Collective error handling: every rank runs a step, errors are gathered, and
every rank raises one typed exception naming the failing ranks. Without
torch.distributed (or with one process) the same code runs locally.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch.distributed as dist

from .errors import ShardckptError

T = TypeVar("T")

__all__ = ["Group", "raise_gathered"]


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a ShardckptError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return ShardckptError(f"{type(exc).__name__}: {exc}")


class Group:
    """The process group a call runs over, or a single process."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.enabled = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.world_size = dist.get_world_size(group) if self.enabled else 1

    def run(self, step: str, fn: Callable[[], T], default_error: type[ShardckptError]) -> T:
        """Run ``fn`` on every rank; if any rank fails, every rank raises."""
        try:
            result: Any = fn()
            failure: BaseException | None = None
        except Exception as e:  # noqa: BLE001 - gathered and re-raised below
            result, failure = None, e
        if not self.enabled or self.world_size == 1:
            if failure is not None:
                raise failure
            return result
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, None if failure is None else _portable(failure), group=self.group)
        failures = {r: e for r, e in enumerate(gathered) if e is not None}
        if failures:
            raise_gathered(step, failures, default_error, local=failure)
        return result

    def broadcast(self, value: T) -> T:
        if not self.enabled or self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return box[0]


def raise_gathered(
    step: str,
    failures: Mapping[int, BaseException],
    default_error: type[ShardckptError],
    local: BaseException | None = None,
) -> None:
    """Raise one exception for failures gathered from ranks (rank -> exception).

    If every failing rank raised the same shardckpt error type, that type is kept
    (with the first failure's attributes), so callers can catch e.g.
    ``CorruptCheckpointError`` whatever rank hit it.
    """
    ranks = sorted(failures)
    first = failures[ranks[0]]
    same = isinstance(first, ShardckptError) and all(type(failures[r]) is type(first) for r in ranks)
    cls: type[ShardckptError] = type(first) if same else default_error  # type: ignore[assignment]
    detail = "; ".join(f"rank {r}: {type(failures[r]).__name__}: {failures[r]}" for r in ranks)
    err = cls.__new__(cls)
    Exception.__init__(err, f"{step} failed on rank(s) {ranks}: {detail}")
    if same:
        err.__dict__.update(first.__dict__)
    err.rank_errors = dict(failures)
    raise err from local
