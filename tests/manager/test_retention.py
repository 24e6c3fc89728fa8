"""Retention policies: pure functions over lists of CheckpointInfo."""

import math

import pytest

from shardckpt.store.retention import (
    CheckpointInfo,
    KeepBest,
    KeepEvery,
    KeepLast,
    newest_valid,
    steps_to_delete,
    steps_to_keep,
)


def info(step, status="valid", **metrics):
    return CheckpointInfo(step=step, path=f"r/step_{step}", status=status, metrics=metrics)


def val_loss(step):
    # Best two: step 7 (0.1) and step 23 (0.2); everything else worse, no ties.
    return {7: 0.1, 23: 0.2}.get(step, 1.0 + step / 100)


def test_fifty_saves_keep_exactly_what_the_policies_say():
    policies = [KeepLast(3), KeepEvery(10), KeepBest("val_loss", "min", 2)]
    kept = []
    for step in range(1, 51):
        kept.append(info(step, val_loss=val_loss(step)))
        doomed = {c.step for c in steps_to_delete(kept, policies)}
        assert step not in doomed, "the newest valid checkpoint was deleted"
        kept = [c for c in kept if c.step not in doomed]
    assert {c.step for c in kept} == {48, 49, 50} | {10, 20, 30, 40} | {7, 23}


def test_each_policy_alone():
    cps = [info(s, acc=s % 5) for s in range(1, 13)] + [info(13, "incomplete"), info(14, "corrupt")]
    assert KeepLast(2).keep(cps) == {11, 12}
    assert KeepEvery(4).keep(cps) == {4, 8, 12}
    assert KeepBest("acc", "max", 2).keep(cps) == {4, 9}  # acc 4 at both
    assert KeepBest("acc", "min", 1).keep(cps) == {10}  # acc 0 at 5 and 10: the newer wins


def test_best_ignores_missing_and_non_finite_metrics():
    cps = [info(1, loss=0.5), info(2), info(3, loss=None), info(4, loss=math.nan), info(5, loss=math.inf)]
    assert KeepBest("loss", "min", 3).keep(cps) == {1}


def test_newest_valid_and_in_flight_are_always_kept():
    cps = [info(1, loss=0.1), info(2, loss=0.9), info(3, loss=0.8), info(4, "incomplete")]
    # KeepBest alone would only keep step 1; the newest valid (3) survives anyway,
    # and the in-flight step 4 is not collected as an incomplete leftover.
    assert {c.step for c in steps_to_delete(cps, [KeepBest("loss", "min", 1)], in_flight={4})} == {2}
    assert {c.step for c in steps_to_delete(cps, [KeepBest("loss", "min", 1)])} == {2, 4}


def test_invalid_checkpoints_are_never_counted_as_kept_or_newest():
    cps = [info(1), info(2), info(3, "corrupt"), info(4, "incomplete"), info(5, "corrupt")]
    assert newest_valid(cps).step == 2
    # KeepLast(1) votes for the newest *valid* one; the corrupt steps 3 and 5 are
    # newer than it, so they stay for inspection; the incomplete leftover goes.
    assert KeepLast(1).keep(cps) == {2}
    assert [c.step for c in steps_to_delete(cps, [KeepLast(1)])] == [1, 4]
    # once a newer valid checkpoint exists, older corrupt ones are collected
    cps.append(info(6))
    assert [c.step for c in steps_to_delete(cps, [KeepLast(1)])] == [1, 2, 3, 4, 5]


def test_no_policies_keeps_every_valid_checkpoint_but_collects_leftovers():
    cps = [info(1), info(2), info(3, "incomplete")]
    assert steps_to_keep(cps, []) == {1, 2}
    assert [c.step for c in steps_to_delete(cps, [])] == [3]


def test_policies_are_frozen_and_validated():
    with pytest.raises(ValueError):
        KeepLast(0)
    with pytest.raises(ValueError):
        KeepEvery(-1)
    with pytest.raises(ValueError):
        KeepBest("loss", "lowest")
    p = KeepLast(2)
    with pytest.raises(AttributeError):
        p.k = 3
    assert KeepLast(2) == p and hash(KeepLast(2)) == hash(p)
