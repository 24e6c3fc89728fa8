"""Replica divergence check: items stored under the same key on several ranks.

Save planning (``planning.plan_globally``) keeps one copy of an item that several
ranks save under the same key and box (a plain tensor or value under the same
key, a ``Replicate()`` DTensor shard). If the ranks' copies differ (DDP replicas
drifted through a bug or nondeterminism), the others would be dropped silently.
This module makes that loud, in three steps of ``save.plan_save``:

1. [coord] planning marks, per rank, the positions of its items another rank
   holds too (``Assignment.replicated``; none for sharded states: then only a
   status is gathered and this check costs nothing).
2. [all]   ``fingerprints(planner, plan, positions)``: CRC32C of this rank's bytes
   of each such item (tensors at memory speed, GIL released; values as the
   writer stores them). Only these small integers go to the coordinator.
3. [coord] ``divergence_of(held, crcs)`` over their cross-rank names
   (``replica_key``): the keys whose copies differ and which ranks hold which
   copy; ``plan_save`` raises ``CheckpointWriteError`` before any byte is written
   (``check_replicas="error"``, the default) or warns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType

from ..format.layout import tensor_bytes
from ..format.objects import resolve_object
from ..native.crc32c import crc32c

__all__ = ["CheckReplicas", "ReplicaDivergenceWarning", "Divergence", "check_mode", "fingerprints", "divergence_of", "replica_key"]

CheckReplicas = Literal["error", "warn", "off"]
_MODES = ("error", "warn", "off")
_SHOWN = 10  # keys named in one message; the count says how many more


class ReplicaDivergenceWarning(UserWarning):
    """``check_replicas="warn"``: replicated items differ between ranks; one copy was saved."""


def check_mode(value: Any) -> CheckReplicas:
    if value not in _MODES:
        raise ValueError(f"check_replicas must be one of {_MODES}, not {value!r}")
    return value  # type: ignore[no-any-return]


def fingerprints(planner: SavePlanner, plan: SavePlan, positions: Sequence[int]) -> list[int]:
    """CRC32C of this rank's copy of each item at ``positions`` of its local plan."""
    out = []
    for i in positions:
        item = plan.items[i]
        if item.type == WriteItemType.BYTE_IO:
            # the bytes the writer would store (torch.save's bytes are a function of the
            # value alone, checked across processes; a BytesIO is taken raw)
            out.append(crc32c(resolve_object(planner.resolve_data, item).getvalue()))
        else:
            out.append(crc32c(tensor_bytes(planner.resolve_data(item))))
    return out


@dataclass(frozen=True)
class Divergence:
    """Keys whose replicas differ: key -> groups of ranks that hold the same bytes."""

    keys: dict[str, list[list[int]]]

    def message(self) -> str:
        shown = list(self.keys.items())[:_SHOWN]
        parts = [f"{k!r}: " + " vs ".join(f"ranks {g}" for g in groups) for k, groups in shown]
        more = len(self.keys) - len(shown)
        tail = f" (and {more} more keys)" if more > 0 else ""
        return (
            f"replicated items differ between ranks (each rank's copy of a key saved by several "
            f"ranks must be identical; only one copy is written): {'; '.join(parts)}{tail}. "
            "Find why the replicas diverged, save per-rank values under per-rank keys, or pass "
            "check_replicas='warn' or 'off'."
        )


def replica_key(summary: Any, position: int) -> tuple[str, tuple[int, ...] | None]:
    """The (key, offsets) naming item ``position`` of a ``planning.Summary`` across ranks
    (offsets None for objects)."""
    kind, _, shape, _ = summary.specs[position]
    if kind == "o":
        return summary.keys[position], None
    return summary.keys[position], tuple(int(x) for x in summary.offsets[position][:len(shape)])


def divergence_of(
    held: Sequence[Sequence[tuple[str, tuple[int, ...] | None]]], crcs: Sequence[Sequence[int]]
) -> Divergence | None:
    """Coordinator: per rank, the keys of its replicated items and its checksums of them."""
    seen: dict[tuple[str, tuple[int, ...] | None], dict[int, list[int]]] = {}
    for rank, (keys, got) in enumerate(zip(held, crcs)):
        if len(keys) != len(got):
            raise ValueError(f"rank {rank} sent {len(got)} replica checksums for {len(keys)} items")
        for k, crc in zip(keys, got):
            seen.setdefault(k, {}).setdefault(crc, []).append(rank)
    bad: dict[str, list[list[int]]] = {}
    for (fqn, offset), by_crc in seen.items():
        if len(by_crc) > 1:
            name = fqn if offset is None or not any(offset) else f"{fqn}@{list(offset)}"
            bad[name] = sorted(by_crc.values())
    return Divergence(bad) if bad else None
