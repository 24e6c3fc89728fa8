"""Our StorageWriter/StorageReader against the call sequences ``torch.distributed.checkpoint``
drives: reuse of one writer/reader across saves and loads, ``reset`` with and
without a ``checkpoint_id``, overwrite (fail closed by default), ``dcp.async_save``,
BYTE_IO items (``io.BytesIO`` values, stored raw), and the value kinds DCP's own
tests put in a state_dict, at 1 and 2 ranks (real gloo processes).
"""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

import shardckpt
from shardckpt.cli import main as cli_main
from shardckpt.dcp import ShardckptReader, ShardckptWriter
from shardckpt.dcp.planner import SafeLoadPlanner
from shardckpt.errors import (
    CheckpointExistsError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsupportedFormatError,
)
from shardckpt.format.manifest import (
    BlobRef,
    ChunkInfo,
    Manifest,
    ObjectEntry,
    decode_manifest,
    encode_manifest,
)
from shardckpt.format.objects import decode_object
from tests.figures import record
from tests.helpers import assert_state_equal
from tests.multiproc import run_multiprocess


def _bio(data: bytes, pos: int | None = None) -> io.BytesIO:
    b = io.BytesIO(data)
    b.seek(len(data) if pos is None else pos)
    return b


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g)
    return {
        "model": {"w": base.t(), "b": torch.randn(3, generator=g).bfloat16()},  # non-contiguous, bf16
        "lst": [torch.arange(3), 7, "s", 0.5, None],
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.25),
        "mask": torch.tensor([True, False, True]),
        "i": 11 + seed, "f": 2.5, "s": "hello", "none": None, "tup": (1, "x"), "raw": b"\x00\xff",
        "losses": _bio(b"loss\x00" + bytes([seed]) * 5, pos=3),
        "empty_bio": io.BytesIO(),
    }


def _target() -> dict:
    return {
        "model": {"w": torch.zeros(6, 4), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "lst": [torch.zeros(3, dtype=torch.long), 0, "", 0.0, 1],
        "empty": torch.empty(0, 5), "scalar": torch.tensor(0.0), "mask": torch.zeros(3, dtype=torch.bool),
        "i": 0, "f": 0.0, "s": "", "none": 0, "tup": None, "raw": None,
        "losses": io.BytesIO(b"a longer stale value, to be replaced"), "empty_bio": io.BytesIO(b"x"),
    }


# ---------------------------------------------------------------- one process

_ROUTES = ["shardckpt", "shardckpt_async", "dcp", "dcp_async"]


def _save(route: str, sd: dict, path) -> None:
    if route == "shardckpt":
        shardckpt.save(sd, path)
    elif route == "shardckpt_async":
        shardckpt.async_save(sd, path).result()
    elif route == "dcp":
        dcp.save(sd, storage_writer=ShardckptWriter(path))
    else:
        dcp.async_save(sd, storage_writer=ShardckptWriter(path)).result()


@pytest.mark.parametrize("load_route", ["shardckpt", "dcp", "dcp_safe"])
@pytest.mark.parametrize("save_route", _ROUTES)
def test_every_value_kind_round_trips(tmp_path, save_route, load_route):
    _save(save_route, _state(), tmp_path / "c")
    got = _target()
    losses = got["losses"]
    if load_route == "shardckpt":
        shardckpt.load(got, tmp_path / "c")
    else:
        planner = SafeLoadPlanner() if load_route == "dcp_safe" else None
        dcp.load(got, storage_reader=ShardckptReader(tmp_path / "c"), planner=planner)
    assert_state_equal(got, _state())
    assert got["losses"] is losses  # written into the state_dict's own BytesIO
    record("dcp contract", cases=1, failed=0)


class _NoUnpicklingPlanner(DefaultLoadPlanner):
    """A foreign planner whose ``load_bytes`` refuses: a BytesIO must not need it."""

    def load_bytes(self, read_item, value):
        raise AssertionError(f"load_bytes called for {read_item.dest_index.fqn}")


def test_bytesio_is_stored_raw_and_loaded_without_unpickling(tmp_path):
    data = bytes(range(256)) * 40  # > INLINE_LIMIT is irrelevant: a BytesIO is always a blob
    shardckpt.save({"buf": _bio(data, pos=17)}, tmp_path / "c")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    e = m["body"]["entries"]["buf"]
    assert e["encoding"] == "bytesio" and e["chunks"][0][1] == 8 + len(data)
    blob = (tmp_path / "c" / e["file"]).read_bytes()[e["offset"]:e["offset"] + 8 + len(data)]
    assert blob[8:] == data and int.from_bytes(blob[:8], "little") == 17  # raw, after the position
    got = {"buf": io.BytesIO()}
    dcp.load(got, storage_reader=ShardckptReader(tmp_path / "c"), planner=_NoUnpicklingPlanner())
    assert got["buf"].getvalue() == data and got["buf"].tell() == 17
    # a BytesIO stored where the state_dict holds something else arrives as a new BytesIO
    fresh = {"buf": None}
    shardckpt.load(fresh, tmp_path / "c")
    assert type(fresh["buf"]) is io.BytesIO and fresh["buf"].getvalue() == data
    record("dcp contract", cases=2, failed=0)


@pytest.mark.parametrize("route", ["shardckpt_async", "dcp_async"])
def test_async_save_holds_the_bytesio_as_it_was_at_the_call(tmp_path, route):
    buf = _bio(b"before")
    if route == "shardckpt_async":
        handle = shardckpt.async_save({"buf": buf}, tmp_path / "c")
    else:
        handle = dcp.async_save({"buf": buf}, storage_writer=ShardckptWriter(tmp_path / "c"))
    buf.write(b"-after")  # the training loop goes on writing
    handle.result()
    got = {"buf": io.BytesIO()}
    shardckpt.load(got, tmp_path / "c")
    assert got["buf"].getvalue() == b"before"
    record("dcp contract", cases=1, failed=0)


def test_values_needing_pickled_code_stay_refused(tmp_path):
    class Sub(io.BytesIO):
        pass

    for bad in ({"x": Sub(b"a")}, {"x": [io.BytesIO(b"a"), torch.nn.Linear(1, 1)]}):
        with pytest.raises(CheckpointWriteError, match="'x"):
            shardckpt.save(bad, tmp_path / "c")
        assert not (tmp_path / "c" / "manifest.json").exists()
    record("dcp contract", cases=2, failed=0)


def test_manifest_validates_bytesio_entries():
    def manifest(entry: ObjectEntry, size: int) -> bytes:
        return encode_manifest(Manifest(save_id="s", world_size=1, created_unix=0.0, chunk_bytes=64,
                                        files={"data/s.bin": size}, entries={"k": entry}, library={}, metadata={}))

    ok = ObjectEntry("bytesio", ("k",), blob=BlobRef("data/s.bin", 0, (ChunkInfo("raw", 8, 8, 0),)))
    assert decode_manifest(manifest(ok, 8)).entries["k"] == ok
    short = ObjectEntry("bytesio", ("k",), blob=BlobRef("data/s.bin", 0, (ChunkInfo("raw", 5, 5, 0),)))
    with pytest.raises(CorruptCheckpointError, match="header"):
        decode_manifest(manifest(short, 8))
    with pytest.raises(CorruptCheckpointError, match="inline"):
        decode_manifest(manifest(ObjectEntry("bytesio", ("k",), value="abc"), 8))
    with pytest.raises(ValueError, match="header"):
        decode_object("bytesio", b"\x00" * 7)
    with pytest.raises(ValueError, match="position"):
        decode_object("bytesio", b"\xff" * 8)
    record("dcp contract", cases=5, failed=0)


def _overwrite_at(path, value: float) -> None:
    dcp.save({"w": torch.full((3,), value)}, storage_writer=ShardckptWriter(path, overwrite=True))


@pytest.mark.parametrize("with_id", [False, True])
def test_one_reader_reused_after_the_checkpoint_was_overwritten(tmp_path, with_id):
    path = tmp_path / "c"
    _overwrite_at(path, 1.0)
    reader = ShardckptReader(path)
    kw = {"checkpoint_id": path} if with_id else {}  # without an id DCP never calls reset()
    for value in (1.0, 2.0, 3.0):
        if value > 1.0:
            _overwrite_at(path, value)
        got = {"w": torch.zeros(3)}
        dcp.load(got, storage_reader=reader, **kw)
        assert torch.equal(got["w"], torch.full((3,), value))
    record("dcp contract", cases=1, failed=0)


def test_reader_rereads_the_manifest_after_a_load_that_failed_in_planning(tmp_path):
    # Regression: a load refused by the planner (shape mismatch) never reached
    # read_data, so the next load with the same reader served the old manifest.
    path = tmp_path / "c"
    _overwrite_at(path, 1.0)
    reader = ShardckptReader(path)
    with pytest.raises(CheckpointException, match="CheckpointMismatchError"):
        dcp.load({"w": torch.zeros(4)}, storage_reader=reader, planner=SafeLoadPlanner())
    _overwrite_at(path, 2.0)
    got = {"w": torch.zeros(3)}
    dcp.load(got, storage_reader=reader)
    assert torch.equal(got["w"], torch.full((3,), 2.0))
    record("dcp contract", cases=1, failed=0)


def test_reader_follows_checkpoint_id_changes(tmp_path):
    for name, v in (("a", 1.0), ("b", 2.0)):
        _overwrite_at(tmp_path / name, v)
    reader = ShardckptReader(tmp_path / "a")
    for name, v in (("a", 1.0), ("b", 2.0), ("a", 1.0)):
        got = {"w": torch.zeros(3)}
        dcp.load(got, storage_reader=reader, checkpoint_id=tmp_path / name)
        assert torch.equal(got["w"], torch.full((3,), v))
    got = {"w": torch.zeros(3)}
    dcp.load(got, storage_reader=reader)  # no id: the last one
    assert torch.equal(got["w"], torch.full((3,), 1.0)) and reader.path == str(tmp_path / "a")
    record("dcp contract", cases=4, failed=0)


def test_writer_reuse_fails_closed_and_follows_checkpoint_id(tmp_path):
    writer = ShardckptWriter(tmp_path / "a")
    dcp.save({"w": torch.ones(3)}, storage_writer=writer)
    for kw in ({}, {"checkpoint_id": tmp_path / "a"}):  # reset(None) or the same id: still refused
        with pytest.raises(CheckpointException, match="CheckpointExistsError"):
            dcp.save({"w": torch.zeros(3)}, storage_writer=writer, **kw)
    got = {"w": torch.zeros(3)}
    shardckpt.load(got, tmp_path / "a")
    assert torch.equal(got["w"], torch.ones(3))  # the refused saves changed nothing
    dcp.save({"w": torch.full((3,), 2.0), "buf": _bio(b"b")}, storage_writer=writer, checkpoint_id=tmp_path / "b")
    dcp.async_save({"w": torch.full((3,), 3.0)}, storage_writer=writer, checkpoint_id=tmp_path / "c").result()
    for name, v in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        got = {"w": torch.zeros(3)}
        shardckpt.load(got, tmp_path / name, strict=False)
        assert torch.equal(got["w"], torch.full((3,), v))
    with pytest.raises(CheckpointExistsError):
        shardckpt.save({"w": torch.zeros(3)}, tmp_path / "b")
    record("dcp contract", cases=4, failed=0)


def test_overwriting_writer_reused_replaces_atomically(tmp_path):
    writer = ShardckptWriter(tmp_path / "a", overwrite=True)
    for v in (1.0, 2.0):
        dcp.save({"w": torch.full((3,), v), "buf": _bio(bytes([int(v)]) * 3)}, storage_writer=writer)
    got = {"w": torch.zeros(3), "buf": io.BytesIO()}
    dcp.load(got, storage_reader=ShardckptReader(tmp_path / "a"))
    assert torch.equal(got["w"], torch.full((3,), 2.0)) and got["buf"].getvalue() == b"\x02" * 3
    assert len(list((tmp_path / "a" / "data").iterdir())) == 1  # the superseded shard is gone
    record("dcp contract", cases=1, failed=0)


def test_cli_and_converters_handle_bytesio(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shardckpt.save({"w": torch.arange(4.0), "buf": _bio(b"abc")}, a)
    shardckpt.save({"w": torch.arange(4.0), "buf": _bio(b"abd")}, b)
    assert cli_main(["inspect", "--json", str(a)]) == 0
    assert json.loads(capsys.readouterr().out)["keys"]["buf"]["encoding"] == "bytesio"
    assert cli_main(["verify", str(a)]) == 0
    assert cli_main(["diff", "--exit-code", str(a), str(b)]) == 1
    assert "content changed  buf" in capsys.readouterr().out
    assert cli_main(["diff", "--exit-code", str(a), str(a)]) == 0
    capsys.readouterr()
    for dst, fmt in (("o.safetensors", "safetensors"), ("o.pt", "torch")):
        rep = shardckpt.convert(a, tmp_path / dst, to=fmt)
        assert [d.key for d in rep.dropped] == ["buf"]  # no form for raw bytes there: dropped, named
    assert set(torch.load(tmp_path / "o.pt", weights_only=True)) == {"w"}
    shardckpt.convert(a, tmp_path / "copy", to="shardckpt")
    shardckpt.convert(a, tmp_path / "asdcp", to="dcp")
    got = {"w": torch.zeros(4), "buf": io.BytesIO()}
    shardckpt.load(got, tmp_path / "copy")
    assert got["buf"].getvalue() == b"abc" and got["buf"].tell() == 3
    got = {"w": torch.zeros(4), "buf": io.BytesIO()}
    dcp.load(got, checkpoint_id=tmp_path / "asdcp")  # DCP's own reader: DCP's own (pickled) form
    assert got["buf"].getvalue() == b"abc"
    # Reading a DCP checkpoint's pickled BytesIO back would mean unpickling a class: refused, typed.
    with pytest.raises(UnsupportedFormatError, match="'buf'"):
        shardckpt.convert(tmp_path / "asdcp", tmp_path / "back", to="shardckpt")
    record("dcp contract", cases=8, failed=0)


# ---------------------------------------------------------------- two ranks


def _two_ranks(rank: int, world_size: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(24.0).reshape(6, 4)

    def state(v: float) -> dict:
        sd = _state()
        sd["dt"] = distribute_tensor(full + v, mesh, [Shard(0)])
        sd["i"] = int(v)
        sd[f"rank{rank}"] = {"buf": _bio(b"r%d-%d" % (rank, int(v)), pos=1), "n": rank}
        return sd

    def target() -> dict:
        sd = _target()
        sd["dt"] = distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])
        sd[f"rank{rank}"] = {"buf": io.BytesIO(), "n": -1}
        return sd

    def check(v: float, got: dict) -> None:
        want = state(v)
        assert torch.equal(got.pop("dt").full_tensor(), want.pop("dt").full_tensor())
        assert_state_equal(got, want)

    writer = ShardckptWriter(f"{root}/a")
    reader = ShardckptReader(f"{root}/a")
    dcp.save(state(1), storage_writer=writer)
    got = target()
    dcp.load(got, storage_reader=reader)
    check(1, got)
    # the same writer, a new id, async; then the reader follows the id
    dcp.async_save(state(2), storage_writer=writer, checkpoint_id=f"{root}/b").result()
    got = target()
    dcp.load(got, storage_reader=reader, checkpoint_id=f"{root}/b")
    check(2, got)
    # fail closed on every rank, nothing changed
    try:
        dcp.save(state(9), storage_writer=writer)
    except CheckpointException as e:
        assert "CheckpointExistsError" in str(e)
    else:
        raise AssertionError("a save over a committed checkpoint went through")
    # overwritten behind the reused reader's back (no id: DCP calls no reset)
    shardckpt.save(state(3), f"{root}/b", overwrite=True)
    got = target()
    dcp.load(got, storage_reader=reader)
    check(3, got)
    shardckpt.async_save(state(4), f"{root}/c").result()
    got = target()
    shardckpt.load(got, f"{root}/c", strict=False)  # the other rank's keys are not ours
    check(4, got)
    dist.barrier()


def test_two_ranks_reuse_async_overwrite_bytesio_dtensor(tmp_path):
    run_multiprocess(_two_ranks, 2, str(tmp_path), timeout=120)
    record("dcp contract", cases=6, failed=0)
