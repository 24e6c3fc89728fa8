"""ResumableSampler: ranks are simulated in one process (one sampler per rank with
explicit num_replicas/rank), so every resharding case is a pure test.

The global order of an epoch is read back by interleaving the ranks round-robin
(rank 0's k-th index, rank 1's k-th, ...): the sampler deals global position
``consumed + k`` to rank ``k % W``, so that interleaving must be the epoch's
permutation from ``consumed`` on.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from shardckpt.state import ResumableSampler

N = 23  # not a multiple of 2 or 3: the epoch end needs padding / dropping
B = 2  # per-rank batch size


def _ranks(world_size: int, n: int = N, **kw) -> list[ResumableSampler]:
    return [ResumableSampler(range(n), num_replicas=world_size, rank=r, **kw) for r in range(world_size)]


def _interleave(per_rank: list[list[int]]) -> list[int]:
    out = []
    for k in range(max(map(len, per_rank), default=0)):
        out += [seq[k] for seq in per_rank if k < len(seq)]
    return out


def _train(samplers: list[ResumableSampler], steps: int | None = None) -> list[int]:
    """Run ``steps`` training steps (None: to the epoch's end) of per-rank batch B on
    every rank, calling ``step(B)`` after each; return the global sequence consumed."""
    iters = [iter(s) for s in samplers]
    seen: list[list[int]] = [[] for _ in samplers]
    done = 0
    while steps is None or done < steps:
        batches = [[i for _, i in zip(range(B), it)] for it in iters]
        if not batches[0]:
            break
        assert len({len(b) for b in batches}) == 1, "ranks must get equal batch counts"
        for s, mine, b in zip(samplers, seen, batches):
            mine += b
            s.step(B)
        done += 1
    return _interleave(seen)


def _resume(samplers: list[ResumableSampler], world_size: int, **kw) -> list[ResumableSampler]:
    sd = samplers[0].state_dict()
    assert all(s.state_dict() == sd for s in samplers), "every rank holds the same position"
    new = _ranks(world_size, samplers[0]._dataset_len(), **kw)
    for s in new:
        s.load_state_dict(sd)
    return new


@pytest.mark.parametrize("n", [N, 24, 1])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("shuffle,drop_last", [(True, False), (True, True), (False, False), (False, True)])
def test_fresh_epoch_is_exactly_distributed_sampler(n, world_size, shuffle, drop_last):
    for epoch in (0, 3):
        for rank in range(world_size):
            kw = dict(num_replicas=world_size, rank=rank, shuffle=shuffle, seed=7, drop_last=drop_last)
            ref, ours = DistributedSampler(range(n), **kw), ResumableSampler(range(n), **kw)
            ref.set_epoch(epoch)
            ours.set_epoch(epoch)
            assert list(ours) == list(ref)
            assert len(ours) == len(ref)


@pytest.mark.parametrize("chain", [(2, 3), (2, 1), (3, 2), (1, 4), (2, 3, 1)])
@pytest.mark.parametrize("steps", [1, 2])
def test_resume_at_other_world_size_continues_the_epoch_in_order(chain, steps):
    samplers = _ranks(chain[0], seed=11)
    for s in samplers:
        s.set_epoch(4)
    perm = samplers[0].global_order().tolist()
    seen = []
    for i, world_size in enumerate(chain):
        if i:
            samplers = _resume(samplers, world_size, seed=11)
            assert samplers[0].epoch == 4
            assert len(samplers[0]) == math.ceil((N - len(seen)) / world_size)
        last = i == len(chain) - 1
        part = _train(samplers, None if last else steps)
        if not last:
            assert samplers[0].consumed == len(seen) + world_size * B * steps
        seen += part
    # One epoch's permutation in order, then only DistributedSampler-style padding at the end.
    assert seen[:N] == perm
    pad = seen[N:]
    assert len(pad) < chain[-1] and pad == perm[: len(pad)]
    assert samplers[0].consumed == N and samplers[0].finished


@pytest.mark.parametrize("w1,w2", [(2, 3), (3, 2), (2, 1)])
def test_resume_with_drop_last(w1, w2):
    samplers = _ranks(w1, drop_last=True)
    perm = samplers[0].global_order().tolist()
    seen = _train(samplers, 2)
    samplers = _resume(samplers, w2, drop_last=True)
    seen += _train(samplers)
    assert seen == perm[: len(seen)], "a prefix of the permutation, no repeats"
    assert N - len(seen) < w2 and (N - len(seen)) == (N - w1 * B * 2) % w2
    assert samplers[0].consumed == N, "the dropped tail counts as consumed: the epoch is over"
    assert list(samplers[0]) == []


def test_shuffle_false_is_the_dataset_order():
    samplers = _ranks(2, shuffle=False)
    seen = _train(samplers, 2)
    seen += _train(_resume(samplers, 3, shuffle=False))
    assert seen[:N] == list(range(N))


def test_epoch_boundaries():
    (s,) = _ranks(1)
    s.set_epoch(0)
    first = _train([s])
    assert first == s.global_order(0).tolist()
    assert s.consumed == N and s.finished and list(s) == []
    s.set_epoch(0)  # same epoch: keeps the (finished) position
    assert list(s) == []
    s.set_epoch(1)
    assert s.consumed == 0 and len(s) == N
    second = list(s)
    assert sorted(second) == list(range(N)) and second != first  # a new order
    # A checkpoint taken at the end of an epoch resumes as finished at any world size.
    (s0,) = _ranks(1)
    _train([s0])
    for t in _resume([s0], 3):
        assert t.finished and len(t) == 0 and list(t) == []


def test_len_counts_what_the_iterator_yields():
    for world_size in (1, 2, 3, 4):
        for drop_last in (False, True):
            samplers = _ranks(2, drop_last=drop_last)
            _train(samplers, 1)
            for s in _resume(samplers, world_size, drop_last=drop_last):
                n = len(s)
                assert n == len(list(s))
                assert len(s) == n, "len is stable during and after an iteration"


def test_step_during_iteration_does_not_move_the_running_iterator():
    (s,) = _ranks(1, shuffle=False)
    it = iter(s)
    got = [next(it) for _ in range(4)]
    s.step(4)
    got += list(it)
    assert got == list(range(N))


def test_dataloader_resume_starts_at_the_position():
    samplers = _ranks(2, seed=3)
    loaders = [DataLoader(list(range(N)), batch_size=B, sampler=s) for s in samplers]
    iters = [iter(dl) for dl in loaders]
    before = []
    for _ in range(3):
        batches = [next(it).tolist() for it in iters]
        for s in samplers:
            s.step(B)
        before.append(batches)
    resumed = _resume(samplers, 3, seed=3)
    first = [next(iter(DataLoader(list(range(N)), batch_size=B, sampler=s))).tolist() for s in resumed]
    perm = samplers[0].global_order().tolist()
    c = 2 * B * 3
    assert first == [[perm[c + r], perm[c + r + 3]] for r in range(3)]


def test_load_state_dict_checks():
    (s,) = _ranks(1)
    sd = s.state_dict()
    (other,) = _ranks(1, n=N + 1)
    with pytest.raises(ValueError, match="dataset of 23 samples"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="not a ResumableSampler state"):
        s.load_state_dict({"epoch": 1})
    (t,) = _ranks(1, seed=99)
    with pytest.warns(UserWarning, match="restoring seed=0"):
        t.load_state_dict(sd)
    assert t.seed == 0
    with pytest.raises(ValueError):
        ResumableSampler(range(3), num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        s.advance(-1)


def test_forgotten_step_is_reported_at_save():
    (s,) = _ranks(1)
    it = iter(s)
    next(it)
    with pytest.warns(UserWarning, match="step\\(\\)/advance\\(\\) was not called"):
        s.state_dict()
    s.step(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.state_dict()


def test_global_order_is_independent_of_world_size():
    orders = {tuple(ResumableSampler(range(N), num_replicas=w, rank=0, seed=5).global_order(2).tolist())
              for w in (1, 2, 3, 7)}
    assert len(orders) == 1
    g = torch.Generator().manual_seed(5 + 2)
    assert list(orders.pop()) == torch.randperm(N, generator=g).tolist()
