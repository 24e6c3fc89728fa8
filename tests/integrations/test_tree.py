"""shardckpt.integrations: a trainer's checkpoint dict saved and loaded exactly,
its skeleton validated, the model-fit check, and finding the newest valid one."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

from shardckpt.errors import CheckpointMismatchError, CorruptCheckpointError, UnsupportedFormatError
from shardckpt.integrations import (
    TREE_KEY,
    SkippedCheckpointWarning,
    by_commit_time,
    check_state_dict,
    children,
    join,
    load_tree,
    newest_valid,
    numbered,
    read_manifest,
    save_tree,
    split,
)
from tests.helpers import assert_state_equal


def _awkward() -> dict:
    """What DCP's flattening loses: empty containers, int keys, tuples, dicts in lists,
    keys with dots, and a key that collides with a nested path."""
    return {
        "state": OrderedDict([("a.weight", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(2, dtype=torch.bfloat16))]),
        "opt": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 3)}, 7: {}},
                 "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 7]}]}],
        "loops": {"fit": {"state_dict": {}, "progress": {"total": 5}}, "empty_list": []},
        "a": {"b": torch.tensor([1, 2])}, "a.b": torch.tensor([3]),
        "tuple": (torch.ones(1), "x", None), "inf": float("-inf"), "blob": b"\x00\x01", "cb{'k': None}": {"v": 1.5},
    }


def test_split_join_is_exact_in_memory():
    tree = _awkward()
    skeleton, flat = split(tree)
    json.dumps(skeleton)  # the skeleton is plain JSON
    assert_state_equal(join(json.loads(json.dumps(skeleton)), flat), tree, bitwise=True, exact_types=True)


def test_save_load_round_trip_is_exact(tmp_path):
    tree = _awkward()
    save_tree(tree, tmp_path / "c")
    got = load_tree(tmp_path / "c")
    assert_state_equal(got, tree, bitwise=True, exact_types=True)
    assert got["opt"][0]["state"][7] == {} and list(got["opt"][0]["state"]) == [0, 7]
    save_tree({"loss": float("nan")}, tmp_path / "n")
    assert load_tree(tmp_path / "n")["loss"] != load_tree(tmp_path / "n")["loss"]  # NaN


def test_background_save_and_live_tensors(tmp_path):
    tree = {"w": torch.randn(4, 4), "meta": {"step": 3}}
    handle = save_tree(tree, tmp_path / "c", background=True)
    tree["w"].zero_()  # after the call: the checkpoint holds the values at the call
    handle.result()
    live = {"w": torch.empty(4, 4)}
    got = load_tree(tmp_path / "c", live=live)
    assert got["w"] is live["w"] and got["w"].abs().sum() > 0
    assert load_tree(tmp_path / "c", skip=("meta",)).keys() == {"w"}


def test_dict_keys_that_cannot_be_stored_are_refused_naming_the_place():
    with pytest.raises(TypeError, match="'outer.inner'.*key 1.5"):
        split({"outer": {"inner": {1.5: torch.ones(1)}}})


def test_malformed_skeleton_is_refused(tmp_path):
    for bad in ({"dict": [["a"]]}, {"what": 1}, {"leaf": 3}, {"dict": [[True, {"leaf": "x"}]]}, [1]):
        with pytest.raises(UnsupportedFormatError):
            join(bad, {"x": 1})
    save_tree({"w": torch.ones(2)}, tmp_path / "c", metadata={"note": 1})
    m = read_manifest(tmp_path / "c")
    with pytest.raises(CorruptCheckpointError, match="'gone'"):
        load_tree(tmp_path / "c", manifest=_with_skeleton(m, {"dict": [["w", {"leaf": "gone"}]]}))


def _with_skeleton(m, skeleton):
    import dataclasses

    return dataclasses.replace(m, metadata={**m.metadata, TREE_KEY: skeleton})


def test_a_plain_shardckpt_checkpoint_is_not_a_trainer_checkpoint(tmp_path):
    import shardckpt

    shardckpt.save({"w": torch.ones(2)}, tmp_path / "plain")
    with pytest.raises(UnsupportedFormatError, match="not one a trainer integration wrote"):
        load_tree(tmp_path / "plain")


def test_check_state_dict_names_every_misfit(tmp_path):
    save_tree({"state_dict": {"a": torch.ones(2, 3), "b": torch.ones(4), "gone": torch.ones(1)}}, tmp_path / "c")
    m = read_manifest(tmp_path / "c")
    live = {"a": torch.ones(2, 3), "b": torch.ones(5), "new": torch.ones(1)}
    with pytest.raises(CheckpointMismatchError) as e:
        check_state_dict(m, tmp_path / "c", ("state_dict",), live)
    assert str(tmp_path / "c") in str(e.value) and "'b'" in str(e.value)
    assert e.value.mismatched.keys() == {"b"} and e.value.missing == ["new"] and e.value.unexpected == ["gone"]
    with pytest.raises(CheckpointMismatchError):  # shapes are checked without strict too
        check_state_dict(m, tmp_path / "c", ("state_dict",), live, strict=False)
    check_state_dict(m, tmp_path / "c", ("state_dict",), {"a": torch.ones(2, 3)}, strict=False)
    with pytest.raises(CheckpointMismatchError, match="holds no 'model'"):
        check_state_dict(m, tmp_path / "c", ("model",), live)


def test_newest_valid_orders_and_skips(tmp_path):
    for step in (5, 10, 20):
        save_tree({"w": torch.full((3,), float(step))}, tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-20" / "manifest.json").unlink()
    (tmp_path / "checkpoint-x").mkdir()
    urls = numbered(children(tmp_path), r"checkpoint-(\d+)")
    assert [u.rsplit("-", 1)[1] for u in urls] == ["20", "10", "5"]
    with pytest.warns(SkippedCheckpointWarning, match="checkpoint-20"):
        assert newest_valid(urls) == str(tmp_path / "checkpoint-10")
    ordered = by_commit_time(children(tmp_path))
    assert ordered[0].endswith("checkpoint-20")  # unreadable first: considered, and warned about
    assert newest_valid([]) is None
