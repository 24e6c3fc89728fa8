"""Single-process save / load / verify: round trips, damage, commit semantics, safety."""

import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import shardckpt
from shardckpt.errors import (
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from tests.helpers import assert_state_equal, blank_like

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64") if hasattr(torch, n)]


def _sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.float64 if not dtype.is_complex else torch.complex128).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype(tmp_path, small_chunks, dtype):
    sd = {"t": _sample(dtype, (37, 5)), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 4))}
    shardckpt.save(sd, tmp_path / "c")
    out = blank_like(sd)
    shardckpt.load(out, tmp_path / "c")
    assert_state_equal(out, sd, bitwise=True)


def test_round_trip_values_views_and_nesting(tmp_path, small_chunks):
    base = torch.randn(16, 9)
    sd = {
        "model": {"w": base.t(), "slice": base[::3, 1:4], "big": torch.randn(3000), "nan": torch.tensor([float("nan"), -0.0, float("inf")])},
        "step": 12, "lr": 1e-3, "name": "run-α", "flag": True, "none": None,
        "hist": [1, 2.5, "x", None, {"k": [True]}], "cfg": {"layers": 4, "act": "gelu"},
        "raw": b"\x00\xffbytes", "tup": (1, "a"), "big_list": list(range(5000)),
    }
    assert not sd["model"]["w"].is_contiguous()
    shardckpt.save(sd, tmp_path / "c")
    out = {"model": blank_like(sd["model"]), "step": 0, "lr": 0.0, "name": "", "flag": False, "none": 1,
           "hist": [0, 0, 0, 0, {"k": [False]}], "cfg": {"layers": 0, "act": ""}, "raw": b"", "tup": (0, ""),
           "big_list": [0] * 5000}
    shardckpt.load(out, tmp_path / "c")
    for k in ("w", "slice", "big"):
        assert torch.equal(out["model"][k], sd["model"][k])
    assert torch.equal(out["model"]["nan"].view(torch.int32), sd["model"]["nan"].view(torch.int32))
    for k in ("step", "lr", "name", "flag", "none", "hist", "cfg", "raw", "tup", "big_list"):
        assert_state_equal(out[k], sd[k], k, bitwise=True)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    entries = manifest["body"]["entries"]
    assert entries["step"]["encoding"] == "json" and entries["step"]["value"] == 12
    assert entries["raw"]["encoding"] == "bytes" and entries["tup"]["encoding"] == "torch"
    assert "file" in entries["big_list"]  # large JSON goes to a shard, not inline
    assert len(entries["model.big"]["shards"][0]["chunks"]) == -(-3000 * 4 // 64)


def test_reads_in_bounded_pieces(tmp_path, small_chunks):
    sd = {"w": torch.randn(200, 30)}
    shardckpt.save(sd, tmp_path / "c")
    out = {"w": torch.zeros(200, 30)}
    with shardckpt.knobs.override(max_read_bytes=30 * 4 * 3):
        shardckpt.load(out, tmp_path / "c")
    assert torch.equal(out["w"], sd["w"])


def test_memory_and_file_urls(tmp_path):
    sd = {"w": torch.randn(50, 3), "n": 3}
    for url in ("memory://shardckpt-test/ckpt1", f"file://{tmp_path}/c"):
        shardckpt.save(sd, url)
        out = {"w": torch.zeros(50, 3), "n": 0}
        shardckpt.load(out, url)
        assert torch.equal(out["w"], sd["w"]) and out["n"] == 3
        assert shardckpt.verify(url).chunks >= 1
        with pytest.raises(CheckpointExistsError):
            shardckpt.save(sd, url)


def _shard_file(path):
    (name,) = os.listdir(path / "data")
    return path / "data" / name


def test_bit_flip_is_named_on_load_and_verify(tmp_path, small_chunks):
    sd = {"a": torch.randn(100), "b": torch.randn(100)}
    shardckpt.save(sd, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    b = manifest["body"]["entries"]["b"]["shards"][0]
    f = _shard_file(tmp_path / "c")
    data = bytearray(f.read_bytes())
    data[b["offset"] + 64 * 2 + 5] ^= 0x10  # inside chunk 2 of "b"
    f.write_bytes(bytes(data))
    out = {"a": torch.zeros(100), "b": torch.full((100,), 7.0)}
    with pytest.raises(CorruptCheckpointError) as ei:
        shardckpt.load(out, tmp_path / "c")
    err = ei.value
    assert err.key == "b" and err.chunk == 2 and err.file.endswith(".bin")
    assert "chunk 2 of key 'b'" in str(err)
    assert torch.all(out["b"][32:48] == 7.0)  # the damaged chunk's bytes never reached the tensor
    with pytest.raises(CorruptCheckpointError) as ei:
        shardckpt.verify(tmp_path / "c")
    assert len(ei.value.damaged) == 1 and ei.value.key == "b"


def test_truncated_shard(tmp_path):
    shardckpt.save({"a": torch.randn(1000)}, tmp_path / "c")
    f = _shard_file(tmp_path / "c")
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        shardckpt.load({"a": torch.zeros(1000)}, tmp_path / "c")
    with pytest.raises(CorruptCheckpointError, match="manifest records"):
        shardckpt.verify(tmp_path / "c")


def test_missing_shard_file(tmp_path):
    shardckpt.save({"a": torch.randn(10)}, tmp_path / "c")
    _shard_file(tmp_path / "c").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        shardckpt.load({"a": torch.zeros(10)}, tmp_path / "c")
    with pytest.raises(CorruptCheckpointError, match="missing"):
        shardckpt.verify(tmp_path / "c")


def test_deleted_manifest_is_incomplete_and_missing_path_is_not_found(tmp_path):
    shardckpt.save({"a": torch.randn(10)}, tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    for fn in (lambda: shardckpt.load({"a": torch.zeros(10)}, tmp_path / "c"), lambda: shardckpt.verify(tmp_path / "c")):
        with pytest.raises(IncompleteCheckpointError):
            fn()
    with pytest.raises(CheckpointNotFoundError):
        shardckpt.load({"a": torch.zeros(10)}, tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError):
        shardckpt.verify(tmp_path / "nope")


def test_manifest_with_parent_path_is_rejected_before_reading(tmp_path):
    shardckpt.save({"a": torch.randn(10)}, tmp_path / "c")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 40)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    old = m["body"]["entries"]["a"]["shards"][0]["file"]
    m["body"]["files"] = {"data/../../secret.bin": {"size": 40}}
    m["body"]["entries"]["a"]["shards"][0]["file"] = "data/../../secret.bin"
    from shardckpt.format.jsoncodec import encode as _canonical
    from shardckpt.native.crc32c import crc32c

    body = {k: v for k, v in m.items() if k != "crc32c"}
    m["crc32c"] = f"{crc32c(_canonical(body)):08x}"
    (tmp_path / "c" / "manifest.json").write_bytes(_canonical(m))
    assert old != m["body"]["entries"]["a"]["shards"][0]["file"]
    with pytest.raises(CorruptCheckpointError, match="escapes"):
        shardckpt.load({"a": torch.zeros(10)}, tmp_path / "c")


def test_save_fails_closed_and_overwrite_is_atomic(tmp_path):
    p = tmp_path / "c"
    shardckpt.save({"a": torch.ones(4)}, p)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        shardckpt.save({"a": torch.zeros(4)}, p)
    out = {"a": torch.zeros(4)}
    shardckpt.load(out, p)
    assert torch.equal(out["a"], torch.ones(4))
    shardckpt.save({"a": torch.full((4,), 2.0)}, p, overwrite=True)
    shardckpt.load(out, p)
    assert torch.equal(out["a"], torch.full((4,), 2.0))
    assert len(os.listdir(p / "data")) == 1  # the superseded shard was removed


def test_incomplete_leftover_is_replaced_but_foreign_files_are_not_touched(tmp_path):
    p = tmp_path / "c"
    (p / "data").mkdir(parents=True)
    (p / "data" / "old-r00000.bin").write_bytes(b"junk")
    (p / "manifest.json.tmp").write_bytes(b"{")
    shardckpt.save({"a": torch.ones(3)}, p)
    assert not (p / "manifest.json.tmp").exists()
    assert "old-r00000.bin" not in os.listdir(p / "data")
    shardckpt.verify(p)
    q = tmp_path / "mine"
    q.mkdir()
    (q / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointExistsError, match="notes.txt"):
        shardckpt.save({"a": torch.ones(3)}, q)
    assert (q / "notes.txt").read_text() == "precious" and not (q / "data").exists()


class _Custom:
    def __init__(self):
        self.x = 1


def test_values_needing_pickle_code_are_refused_at_save(tmp_path):
    with pytest.raises(CheckpointWriteError, match="'obj'"):
        shardckpt.save({"a": torch.ones(2), "obj": _Custom()}, tmp_path / "c")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_malicious_pickle_in_checkpoint_never_runs(tmp_path):
    p = tmp_path / "c"
    shardckpt.save({"tup": (1, 2)}, p)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil(), protocol=2)
    f = _shard_file(p)
    f.write_bytes(payload)
    m = json.loads((p / "manifest.json").read_text())
    from shardckpt.format.jsoncodec import encode as _canonical
    from shardckpt.native.crc32c import crc32c

    m["body"]["files"] = {k: {"size": len(payload)} for k in m["body"]["files"]}
    m["body"]["entries"]["tup"]["chunks"] = [["raw", len(payload), len(payload), crc32c(payload)]]
    m["body"]["entries"]["tup"]["offset"] = 0
    body = {k: v for k, v in m.items() if k != "crc32c"}
    m["crc32c"] = f"{crc32c(_canonical(body)):08x}"
    (p / "manifest.json").write_bytes(_canonical(m))
    with pytest.raises(CorruptCheckpointError, match="does not decode safely.*system"):
        shardckpt.load({"tup": (0, 0)}, p)
    # and through DCP's own planner, which would unpickle with weights_only=False
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"tup": (0, 0)}, storage_reader=shardckpt.ShardckptReader(p), no_dist=True)
    assert isinstance(ei.value.failures[0][0], CorruptCheckpointError)
    assert not marker.exists()


def test_mismatch_lists_everything(tmp_path):
    shardckpt.save({"a": torch.ones(3), "b": torch.ones(2, 2), "c": torch.ones(1), "s": 1}, tmp_path / "c")
    target = {"a": torch.zeros(4), "b": torch.zeros(2, 2, dtype=torch.float64), "x": torch.zeros(1), "s": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as ei:
        shardckpt.load(target, tmp_path / "c")
    e = ei.value
    assert e.missing == ["x"] and e.unexpected == ["c"]
    assert set(e.mismatched) == {"a", "b", "s"} and "shape" in e.mismatched["a"] and "dtype" in e.mismatched["b"]
    assert torch.equal(target["a"], torch.zeros(4))  # nothing was loaded


def test_non_strict_skips_missing_and_unexpected(tmp_path):
    shardckpt.save({"a": torch.ones(3), "c": torch.ones(1)}, tmp_path / "c")
    target = {"a": torch.zeros(3), "x": torch.zeros(1)}
    shardckpt.load(target, tmp_path / "c", strict=False)
    assert torch.equal(target["a"], torch.ones(3)) and torch.equal(target["x"], torch.zeros(1))
    with pytest.raises(CheckpointMismatchError, match="shape"):
        shardckpt.load({"a": torch.zeros(5)}, tmp_path / "c", strict=False)


def test_dcp_interop_single_process(tmp_path):
    sd = {"w": torch.randn(5, 5), "n": 4}
    dcp.save(sd, storage_writer=shardckpt.ShardckptWriter(tmp_path / "a"), no_dist=True)
    out = {"w": torch.zeros(5, 5), "n": 0}
    shardckpt.load(out, tmp_path / "a")
    assert torch.equal(out["w"], sd["w"]) and out["n"] == 4
    shardckpt.save(sd, tmp_path / "b")
    out = {"w": torch.zeros(5, 5), "n": 0}
    dcp.load(out, storage_reader=shardckpt.ShardckptReader(tmp_path / "b"), no_dist=True)
    assert torch.equal(out["w"], sd["w"]) and out["n"] == 4


def test_user_metadata_and_report(tmp_path):
    shardckpt.save({"a": torch.ones(3)}, tmp_path / "c", metadata={"step": 5, "tags": ["x"]})
    r = shardckpt.verify(tmp_path / "c")
    assert r.manifest.metadata == {"step": 5, "tags": ["x"]} and r.bytes_checked == 12 and r.files == 1
    with pytest.raises(TypeError, match="JSON"):
        shardckpt.save({"a": torch.ones(3)}, tmp_path / "d", metadata={"x": object()})


def test_errors_pickle_with_attributes():
    e = CorruptCheckpointError("boom", file="f", key="k", chunk=3)
    e.rank_errors = {1: ValueError("x")}
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is CorruptCheckpointError and str(e2) == "boom"
    assert (e2.file, e2.key, e2.chunk) == ("f", "k", 3) and isinstance(e2.rank_errors[1], ValueError)


def test_repeated_loads_reuse_read_buffers(tmp_path, small_chunks):
    # the read buffer pool outlives a load; buffers of different sizes must be reused correctly
    sd = {"a": torch.randn(3), "b": torch.randn(500), "c": torch.randn(40, 7), "d": torch.randn(2000)}
    shardckpt.save(sd, tmp_path / "c")
    for threads in (1, 2, 3, 2):
        out = {k: torch.zeros_like(v) for k, v in sd.items()}
        with shardckpt.knobs.override(io_threads=threads, max_read_bytes=1024):
            shardckpt.load(out, tmp_path / "c")
        for k in sd:
            assert torch.equal(out[k], sd[k]), (threads, k)


def test_verify_decodes_chunks_whose_crc_matches(tmp_path):
    """A compressed chunk rewritten with a matching CRC but undecodable bytes: load and
    verify both report it (verify used to check CRCs only)."""
    from shardckpt.format.manifest import decode_manifest, encode_manifest
    from shardckpt.native.crc32c import crc32c
    from shardckpt.store import CheckpointDir

    p = tmp_path / "c"
    sd = {"w": torch.zeros(50_000)}  # compresses well: every chunk is encoded
    shardckpt.save(sd, p, compression="zstd")
    ckpt = CheckpointDir.at(p)
    m = ckpt.read_manifest()
    shard = m.entries["w"].shards[0]
    c0 = shard.blob.chunks[0]
    assert c0.codec != "raw"
    path = p / shard.blob.file
    data = bytearray(path.read_bytes())
    garbage = bytes(range(256)) * (c0.stored_len // 256 + 1)
    data[shard.blob.offset:shard.blob.offset + c0.stored_len] = garbage[:c0.stored_len]
    path.write_bytes(bytes(data))
    new_chunk = type(c0)(c0.codec, c0.raw_len, c0.stored_len, crc32c(garbage[:c0.stored_len]))
    import dataclasses

    blob = dataclasses.replace(shard.blob, chunks=(new_chunk, *shard.blob.chunks[1:]))
    entry = dataclasses.replace(m.entries["w"], shards=(dataclasses.replace(shard, blob=blob),))
    (p / "manifest.json").write_bytes(encode_manifest(dataclasses.replace(m, entries={"w": entry})))
    assert decode_manifest((p / "manifest.json").read_bytes()).entries["w"].shards[0].blob.chunks[0] == new_chunk
    with pytest.raises(CorruptCheckpointError, match="does not decode") as e:
        shardckpt.verify(p)
    assert e.value.key == "w" and e.value.chunk == 0
    with pytest.raises(CorruptCheckpointError, match="does not decode"):
        shardckpt.load({"w": torch.ones(50_000)}, p)


def test_reused_reader_sees_an_overwritten_checkpoint(tmp_path):
    p = tmp_path / "c"
    shardckpt.save({"a": torch.zeros(10)}, p)
    reader = shardckpt.ShardckptReader(p)
    out = {"a": torch.ones(10)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert torch.equal(out["a"], torch.zeros(10))
    shardckpt.save({"a": torch.full((10,), 7.0)}, p, overwrite=True)
    dcp.load(out, storage_reader=reader, no_dist=True)  # same path, same reader: re-reads the manifest
    assert torch.equal(out["a"], torch.full((10,), 7.0))


def test_save_leaves_no_probe_behind(tmp_path):
    p = tmp_path / "c"
    shardckpt.save({"a": torch.zeros(10)}, p)
    assert not [n for n in os.listdir(p / "data") if n.endswith(".probe")]
