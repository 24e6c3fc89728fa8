"""The one JSON codec (``shardckpt.format.jsoncodec``) and its NaN rule, applied
everywhere: object values, save metadata, manager metrics, TrainState fields,
local-tier commit markers."""

from __future__ import annotations

import json
import math

import pytest
import torch

import shardckpt
from shardckpt.format import jsoncodec
from shardckpt.format.manifest import MANIFEST_NAME
from shardckpt.manager.tiers.local_commit import LocalCommit, decode_commit, encode_commit
from shardckpt.state import TrainState

NONFINITE = {"nan": math.nan, "inf": math.inf, "neg": -math.inf}


def _same(a, b) -> bool:
    """Equality that counts NaN equal to NaN, types included."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("value", [
    {"b": [1.5, math.nan], "a": -math.inf}, [math.inf, None, True, "x", 0, -0.0], math.nan, {},
    {"nested": {"deep": [{"x": math.inf}]}},
])
def test_round_trip_with_nonfinite_floats(value):
    data = jsoncodec.encode(value)
    assert b"NaN" not in data and b"Infinity" not in data
    json.loads(data, parse_constant=lambda c: pytest.fail(f"non-standard token {c}"))  # strict JSON
    assert _same(jsoncodec.decode(data), value)
    assert jsoncodec.encode(jsoncodec.decode(data)) == data  # canonical: one encoding


def test_canonical_sorts_keys_and_object_values_keep_their_order():
    assert jsoncodec.encode({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
    assert jsoncodec.encode({"b": 1, "a": 2}, canonical=False) == b'{"b":1,"a":2}'


@pytest.mark.parametrize("value, where", [
    ({"$float": "nan"}, "value"), ({"k": {1: 2}}, "value['k']"), ([(1, 2)], "value[0]"),
    ({"t": torch.ones(1)}, "value['t']"),
])
def test_values_json_cannot_hold_exactly_are_refused_naming_where(value, where):
    assert not jsoncodec.is_exact(value)
    with pytest.raises(jsoncodec.JsonValueError) as e:
        jsoncodec.encode(value)
    assert e.value.where == where


@pytest.mark.parametrize("data, why", [
    (b'{"a":1,"a":2}', "duplicate key"), (b"[NaN]", "NaN is not JSON"), (b"Infinity", "Infinity"),
    (b'{"$float":"huge"}', "must be one of"), (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b"\xff", "not valid JSON"), (b'{"a":', "not valid JSON"),
])
def test_strict_decoding(data, why):
    with pytest.raises(jsoncodec.JsonValueError, match=why):
        jsoncodec.decode(data)


def test_legacy_tokens_only_when_asked():
    assert math.isinf(jsoncodec.decode(b"[Infinity]", legacy_tokens=True)[0])
    with pytest.raises(jsoncodec.JsonValueError):
        jsoncodec.decode(b"[Infinity]")


def test_object_values_with_nonfinite_floats_are_stored_as_json(tmp_path):
    value = {"best": math.inf, "hist": [1.0, math.nan, -math.inf]}
    shardckpt.save({"v": value, "t": torch.arange(3)}, tmp_path / "c")
    doc = jsoncodec.decode((tmp_path / "c" / MANIFEST_NAME).read_bytes())
    entries = doc["body"]["entries"]  # (a dict value is flattened into one entry per key)
    assert {k: entries[k]["encoding"] for k in ("v.best", "v.hist")} == {"v.best": "json", "v.hist": "json"}
    out = {"v": {"best": None, "hist": None}, "t": torch.zeros(3, dtype=torch.int64)}
    shardckpt.load(out, tmp_path / "c")
    assert _same(out["v"], value)


def test_tagged_dict_value_is_stored_exactly_through_the_torch_encoding(tmp_path):
    value = ({"$float": "nan"},)  # a user's dict that looks like the safe form: not JSON-exact
    shardckpt.save({"v": value}, tmp_path / "c")
    doc = jsoncodec.decode((tmp_path / "c" / MANIFEST_NAME).read_bytes())
    assert doc["body"]["entries"]["v"]["encoding"] == "torch"
    out = {"v": None}
    shardckpt.load(out, tmp_path / "c")
    assert out["v"] == ({"$float": "nan"},)


def test_save_metadata_follows_the_rule(tmp_path):
    shardckpt.save({"t": torch.ones(2)}, tmp_path / "c", metadata={"loss": math.nan, "best": math.inf})
    assert shardckpt.verify(tmp_path / "c").chunks >= 1  # (raises on any damage)
    doc = jsoncodec.decode((tmp_path / "c" / MANIFEST_NAME).read_bytes())
    assert math.isnan(doc["body"]["metadata"]["loss"]) and doc["body"]["metadata"]["best"] == math.inf
    with pytest.raises(TypeError, match=r"metadata\['x'\]"):
        shardckpt.save({"t": torch.ones(2)}, tmp_path / "d", metadata={"x": {"$float": "inf"}})
    assert not (tmp_path / "d").exists()


def test_train_state_fields_round_trip_nonfinite_and_read_legacy_tokens():
    state = TrainState(extra={"best_val": math.inf, "h": [math.nan]})
    sd = state.state_dict()
    assert "Infinity" not in sd["extra"] and "$float" in sd["extra"]
    again = TrainState()
    again.load_state_dict(sd)
    assert again.extra["best_val"] == math.inf and math.isnan(again.extra["h"][0])
    legacy = dict(sd, extra='{"best_val": Infinity}')  # as shardckpt 0.1 wrote it
    old = TrainState()
    old.load_state_dict(legacy)
    assert old.extra["best_val"] == math.inf


def test_local_commit_marker_keeps_nonfinite_metrics():
    c = LocalCommit(step=3, world_size=1, nodes=("n",), replicas=((),), layouts=("x",), manifests=(1,),
                    metrics={"loss": math.nan, "acc": None, "best": -math.inf}, created_unix=1.0)
    back = decode_commit(encode_commit(c), "marker")
    assert math.isnan(back.metrics["loss"]) and back.metrics["acc"] is None and back.metrics["best"] == -math.inf


def test_a_manifest_field_that_must_be_finite_refuses_the_safe_form():
    """The safe form lets NaN into JSON; fields with a finite meaning still refuse it."""
    from dataclasses import replace

    from shardckpt.errors import CorruptCheckpointError
    from shardckpt.format.manifest import Manifest, decode_manifest, encode_manifest

    good = Manifest(save_id="s", world_size=1, created_unix=1.0, chunk_bytes=4, files={}, entries={},
                    library={}, metadata={"loss": math.nan})
    assert math.isnan(decode_manifest(encode_manifest(good)).metadata["loss"])
    with pytest.raises(CorruptCheckpointError, match="created_unix.*not a finite number"):
        decode_manifest(encode_manifest(replace(good, created_unix=math.inf)))
