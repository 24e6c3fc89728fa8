"""A distributed sampler whose position survives a restart at any world size.

Design. An epoch's *global order* is a permutation of ``range(len(dataset))``
fixed by ``(seed, epoch)`` alone (``torch.randperm`` seeded with ``seed +
epoch``, exactly as ``DistributedSampler`` does), never by the world size. The
sampler's position is ``consumed``: how many entries of that global order the
training loop has finished, counted over all ranks. An iterator started at
world size ``W`` deals the rest of the order round-robin: the entry at global
position ``consumed + k`` goes to rank ``k % W``. So one training step of a
per-rank batch ``B`` consumes the ``W * B`` positions right after ``consumed``,
and the union of what all ranks have seen is always a prefix of the global
order, whatever the world size was when each part of it was consumed.

The epoch end is handled as ``DistributedSampler`` handles it, from the resume
point on: without ``drop_last`` the remainder is padded up to a multiple of
``W`` with entries from the start of the epoch's order; with ``drop_last`` the
last ``(len - consumed) % W`` entries are dropped. Started at ``consumed == 0``
the sampler yields exactly what ``DistributedSampler`` yields.

Counting. ``consumed`` only moves when told: call ``sampler.step(batch_size)``
once per finished training step (``batch_size`` per rank), or
``sampler.advance(n)`` with a global count. Counting indices as the iterator
hands them out would be wrong: a ``DataLoader`` pulls indices ahead of training
(its workers prefetch ``prefetch_factor * num_workers`` batches), so a
checkpoint would skip samples that were fetched but never trained on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]

_STATE_VERSION = 1


class ResumableSampler(Sampler[int]):
    """Drop-in for ``torch.utils.data.distributed.DistributedSampler`` that can
    resume mid-epoch at any world size.

    Same constructor and ``set_epoch`` as ``DistributedSampler``; without
    torch.distributed, ``num_replicas``/``rank`` default to 1/0 instead of
    raising. Differences: ``set_epoch`` with the current epoch keeps the position
    (so the usual ``for epoch in range(start, n): sampler.set_epoch(epoch)``
    resumes mid-epoch), and the training loop reports progress with ``step``:

    >>> sampler = ResumableSampler(dataset, shuffle=True, seed=0)
    >>> loader = DataLoader(dataset, batch_size=B, sampler=sampler)
    >>> for epoch in range(sampler.epoch, epochs):
    ...     sampler.set_epoch(epoch)
    ...     for batch in loader:
    ...         train_step(batch)
    ...         sampler.step(B)          # B samples per rank finished
    >>> sampler.state_dict()             # {"epoch", "consumed" (global), "seed", ...}

    An iterator is planned when it is created (``iter(sampler)``, i.e. when the
    ``DataLoader`` loop starts) from the position at that moment; ``step`` calls
    during the iteration update the position, not the running iterator. Once an
    epoch is finished, further iterators of the same epoch are empty until
    ``set_epoch`` moves to another epoch.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank {rank}, rank should be in the interval [0, {num_replicas - 1}]")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        #: Entries of this epoch's global order finished by the training loop (all ranks).
        self.consumed = 0
        self._start = 0  # position the current (or next) iterator starts from
        self._yielded = 0  # indices handed out since _start: only for a forgotten-step() hint

    # -- the order ---------------------------------------------------------------------------

    def _dataset_len(self) -> int:
        return len(self.dataset)

    def global_order(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's global order (int64 tensor): a permutation of the dataset indices."""
        n = self._dataset_len()
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator()
        g.manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        return torch.randperm(n, generator=g)

    def _per_rank(self, start: int) -> int:
        remaining = max(self._dataset_len() - start, 0)
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)

    def __len__(self) -> int:
        """Indices this rank gets from the current (or next) iterator."""
        return self._per_rank(self._start)

    def __iter__(self) -> Iterator[int]:
        start = self.consumed
        self._start, self._yielded = start, 0
        per_rank = self._per_rank(start)
        total = per_rank * self.num_replicas
        order = self.global_order()
        rest = order[start : start + total]
        if len(rest) < total:  # pad with the epoch's first entries, like DistributedSampler
            pad = total - len(rest)
            rest = torch.cat([rest, order.repeat(math.ceil(pad / len(order)))[:pad]])
        mine = rest[self.rank :: self.num_replicas].tolist()
        return self._count(mine)

    def _count(self, indices: list[int]) -> Iterator[int]:
        for i in indices:
            self._yielded += 1
            yield i

    # -- progress ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order). Moving to another epoch starts it from the
        beginning; the current epoch keeps its position."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.consumed, self._start, self._yielded = epoch, 0, 0, 0

    def advance(self, num_samples: int) -> None:
        """Record that ``num_samples`` more entries of the global order (over all
        ranks) were trained on. Reaching the end of the epoch at this world size
        (including ``drop_last``'s dropped tail) sets ``consumed`` to the dataset
        length."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        end = min(self._start + self._per_rank(self._start) * self.num_replicas, self._dataset_len())
        consumed = self.consumed + int(num_samples)
        self.consumed = self._dataset_len() if consumed >= end else consumed

    def step(self, batch_size: int) -> None:
        """Record one finished training step of ``batch_size`` samples on every rank
        (``advance(batch_size * num_replicas)``). Call it once per step, after the step."""
        self.advance(int(batch_size) * self.num_replicas)

    @property
    def finished(self) -> bool:
        """True when no index is left in this epoch at this world size."""
        return self._per_rank(self.consumed) == 0

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: ``epoch``, ``consumed`` (global), ``seed``, ``shuffle``,
        ``dataset_len``, plus ``drop_last`` and ``num_replicas`` for the record."""
        if self._yielded and self.consumed == self._start and not self.finished:
            warnings.warn(
                f"ResumableSampler handed out {self._yielded} indices of epoch {self.epoch} but "
                "step()/advance() was not called since; the saved position is where the "
                "iteration started, so a resume repeats those samples",
                stacklevel=2,
            )
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_len": self._dataset_len(),
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position saved at any world size. The saved ``seed`` and
        ``shuffle`` win (with a warning if the constructor said otherwise): the
        epoch must continue in the order it started in."""
        try:
            version = int(state_dict["version"])
            epoch, consumed = int(state_dict["epoch"]), int(state_dict["consumed"])
            seed, shuffle = int(state_dict["seed"]), bool(state_dict["shuffle"])
            dataset_len = int(state_dict["dataset_len"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a ResumableSampler state: {type(e).__name__}: {e}") from None
        if version != _STATE_VERSION:
            raise ValueError(f"ResumableSampler state version {version} is not supported")
        if dataset_len != self._dataset_len():
            raise ValueError(
                f"the checkpoint's sampler saw a dataset of {dataset_len} samples, this one has "
                f"{self._dataset_len()}: the saved position means nothing for a different dataset"
            )
        if not 0 <= consumed <= dataset_len:
            raise ValueError(f"consumed={consumed} outside [0, {dataset_len}]")
        if (seed, shuffle) != (self.seed, self.shuffle):
            warnings.warn(
                f"ResumableSampler: restoring seed={seed}, shuffle={shuffle} from the checkpoint "
                f"(constructed with seed={self.seed}, shuffle={self.shuffle})",
                stacklevel=2,
            )
        self.epoch, self.consumed, self.seed, self.shuffle = epoch, consumed, seed, shuffle
        self._start, self._yielded = consumed, 0
