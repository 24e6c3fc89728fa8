"""Retention policies: which checkpoints of a run to keep.

Each policy is a small frozen dataclass that looks at the checkpoints of a run
and names the steps it wants kept; policies compose by union (a checkpoint is
kept if any policy keeps it), like orbax's ``SaveDecisionPolicy`` objects. The
functions here are pure: no I/O, no torch.distributed, so they are tested on
lists of ``CheckpointInfo``.

>>> policies = [KeepLast(3), KeepEvery(1000), KeepBest("val_loss", "min", 2)]
>>> doomed = steps_to_delete(infos, policies, in_flight={1200})

Whatever the policies say, ``steps_to_delete`` never returns the newest valid
checkpoint nor one in flight (invariant 5 of DESIGN.md): a policy that keeps
only the best metric must not leave a run with nothing to resume from the
newest state.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "CheckpointInfo",
    "CheckpointStatus",
    "RetentionPolicy",
    "KeepLast",
    "KeepEvery",
    "KeepBest",
    "build_policies",
    "metric_values",
    "newest_valid",
    "steps_to_keep",
    "steps_to_delete",
]

CheckpointStatus = Literal["valid", "incomplete", "corrupt"]


@dataclass(frozen=True)
class CheckpointInfo:
    """One step directory of a managed run, as ``CheckpointManager.list()`` reports it.

    ``status``: ``"valid"`` (committed manifest that decodes and validates; with
    ``list(deep=True)`` also every chunk's CRC32C), ``"incomplete"`` (no committed
    manifest: a save that never finished, or one in flight) or ``"corrupt"``
    (damaged manifest or, with ``deep=True``, damaged data); ``reason`` says why
    when not valid. ``size_bytes``, ``created_unix`` and ``metrics`` come from the
    manifest and are ``None`` / empty when it cannot be read. A metric that was
    not a finite number at save time is stored as ``None``. ``tiers``: where a
    manager with a local tier holds the step (``"local"``: this node's
    ``local_root``; ``"remote"``: the durable root); empty without a local tier.
    """

    step: int
    path: str
    status: CheckpointStatus
    size_bytes: int | None = None
    created_unix: float | None = None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    reason: str | None = None
    tiers: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.status == "valid"


@runtime_checkable
class RetentionPolicy(Protocol):
    """Names the steps it wants kept among ``checkpoints`` (all statuses are passed;
    a policy should only ever vote for valid ones)."""

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]: ...


def _valid(checkpoints: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    return [c for c in checkpoints if c.status == "valid"]


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``k`` newest valid checkpoints."""

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"KeepLast(k) needs an integer k >= 1, got {self.k!r}")

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]:
        steps = sorted({c.step for c in _valid(checkpoints)}, reverse=True)
        return frozenset(steps[: self.k])


@dataclass(frozen=True)
class KeepEvery:
    """Keep every valid checkpoint whose step is a multiple of ``n`` (step 0 included)."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"KeepEvery(n) needs an integer n >= 1, got {self.n!r}")

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]:
        return frozenset(c.step for c in _valid(checkpoints) if c.step % self.n == 0)


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` valid checkpoints with the best value of ``metric``.

    ``mode="min"`` keeps the smallest values (losses), ``"max"`` the largest
    (accuracies). Checkpoints without the metric, or with a non-finite value,
    never count as best. Ties go to the newer step, so a plateau keeps the most
    recent state.
    """

    metric: str
    mode: Literal["min", "max"] = "min"
    k: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest mode must be 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"KeepBest(k) needs an integer k >= 1, got {self.k!r}")

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]:
        scored = []
        for c in _valid(checkpoints):
            v = c.metrics.get(self.metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                scored.append((v if self.mode == "min" else -v, -c.step))
        scored.sort()
        return frozenset(-neg_step for _, neg_step in scored[: self.k])


def build_policies(
    keep_last: int | None = None,
    keep_every: int | None = None,
    keep_best: tuple[str, str] | tuple[str, str, int] | None = None,
    policies: Iterable[RetentionPolicy] | None = None,
) -> tuple[RetentionPolicy, ...]:
    """The policies of ``CheckpointManager``'s shorthand arguments plus any given ones."""
    out: list[RetentionPolicy] = []
    if keep_last is not None:
        out.append(KeepLast(keep_last))
    if keep_every is not None:
        out.append(KeepEvery(keep_every))
    if keep_best is not None:
        if not isinstance(keep_best, tuple) or len(keep_best) not in (2, 3):
            raise ValueError(f"keep_best must be (metric, 'min'|'max'[, k]), got {keep_best!r}")
        out.append(KeepBest(*keep_best))  # type: ignore[arg-type]
    for p in policies or ():
        if not isinstance(p, RetentionPolicy):
            raise TypeError(f"{p!r} is not a retention policy (it needs a keep(checkpoints) method)")
        out.append(p)
    return tuple(out)


def metric_values(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as stored in a manifest: floats (NaN and infinities kept: the JSON codec
    stores them in its JSON-safe form; ``KeepBest`` never ranks a non-finite value).
    Accepts Python and numpy numbers and 0-d tensors; anything else is a ``TypeError``."""
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be strings, got {k!r}")
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__}") from None
        out[k] = f
    return out


def newest_valid(checkpoints: Iterable[CheckpointInfo]) -> CheckpointInfo | None:
    """The valid checkpoint with the highest step, or None."""
    return max(_valid(checkpoints), key=lambda c: c.step, default=None)


def steps_to_keep(
    checkpoints: Sequence[CheckpointInfo],
    policies: Sequence[RetentionPolicy],
    in_flight: Collection[int] = (),
) -> frozenset[int]:
    """The union of what every policy keeps, plus the newest valid step and any in flight.

    With no policies at all, every valid checkpoint is kept (retention is off).
    """
    keep = set(in_flight)
    newest = newest_valid(checkpoints)
    if newest is not None:
        keep.add(newest.step)
    if not policies:
        keep.update(c.step for c in _valid(checkpoints))
    for policy in policies:
        keep |= policy.keep(checkpoints)
    return frozenset(keep)


def steps_to_delete(
    checkpoints: Sequence[CheckpointInfo],
    policies: Sequence[RetentionPolicy],
    in_flight: Collection[int] = (),
) -> list[CheckpointInfo]:
    """The checkpoints retention removes, oldest first.

    - valid ones no policy keeps (never the newest valid one);
    - incomplete ones (leftovers of crashed saves), unless in flight;
    - corrupt ones older than the newest valid checkpoint. A corrupt one newer
      than that is left in place for inspection (``restore`` warns about it) until
      a newer valid checkpoint supersedes it.
    """
    keep = steps_to_keep(checkpoints, policies, in_flight)
    newest = newest_valid(checkpoints)
    out = []
    for c in sorted(checkpoints, key=lambda c: c.step):
        if c.step in keep:
            continue
        if c.status == "corrupt" and (newest is None or c.step > newest.step):
            continue
        out.append(c)
    return out
