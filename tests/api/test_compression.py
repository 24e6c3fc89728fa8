"""Compression through save/load/verify: codecs per chunk, damage, hostile manifests."""

import json
import os

import pytest
import torch

import shardckpt
from shardckpt.errors import CorruptCheckpointError
from shardckpt.format.jsoncodec import encode as _canonical
from shardckpt.native.crc32c import crc32c
from tests.helpers import assert_state_equal, blank_like


def _state():
    g = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(50_000, generator=g),
        "bf16": torch.randn(40_001, generator=g).bfloat16(),
        "f16": torch.randn(333, generator=g).half(),
        "f64": torch.randn(1000, generator=g).double(),
        "i64": torch.arange(20_000),
        "u8": torch.randint(0, 3, (10_000,), generator=g, dtype=torch.uint8),
        "rand": torch.randint(0, 256, (30_000,), generator=g, dtype=torch.uint8),  # incompressible
        "special": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 0.0] * 100),
        "c64": torch.randn(500, generator=g, dtype=torch.complex64),
        "n": 3,
    }


@pytest.mark.parametrize("compression", ["zstd", shardckpt.Compression(level=1, threads=1),
                                          shardckpt.Compression(byte_group=False, threads=3)])
def test_round_trip_is_exact_and_smaller(tmp_path, compression):
    sd = _state()
    with shardckpt.knobs.override(chunk_bytes=16 << 10):
        shardckpt.save(sd, tmp_path / "z", compression=compression)
        shardckpt.save(sd, tmp_path / "r")
    out = blank_like(sd, {"n": 0})
    shardckpt.load(out, tmp_path / "z")
    assert_state_equal(out, sd, bitwise=True)
    size = lambda p: sum(os.path.getsize(os.path.join(p, "data", f)) for f in os.listdir(p / "data"))  # noqa: E731
    assert size(tmp_path / "z") < 0.8 * size(tmp_path / "r")
    codecs = {c[0] for e in json.loads((tmp_path / "z" / "manifest.json").read_text())["body"]["entries"].values()
              for s in e.get("shards", []) for c in s["chunks"]}
    assert "raw" in codecs and len(codecs) >= 2  # mixed codecs in one checkpoint (random bytes stay raw)
    assert shardckpt.verify(tmp_path / "z").chunks > 10


def _rewrite(path, edit_chunk, edit_bytes=None):
    """Edit the first compressed chunk and re-seal every CRC, so only decoding can notice."""
    m = json.loads((path / "manifest.json").read_text())
    for key, e in m["body"]["entries"].items():
        for s in e.get("shards", []):
            pos = s["offset"]
            for c in s["chunks"]:
                if c[0] != "raw":
                    (f,) = os.listdir(path / "data")
                    data = bytearray((path / "data" / f).read_bytes())
                    stored = bytes(data[pos : pos + c[2]])
                    if edit_bytes:
                        stored = edit_bytes(stored)
                        data[pos : pos + c[2]] = stored
                        (path / "data" / f).write_bytes(bytes(data))
                    c[3] = crc32c(stored)
                    edit_chunk(c)
                    body = {k: v for k, v in m.items() if k != "crc32c"}
                    m["crc32c"] = f"{crc32c(_canonical(body)):08x}"
                    (path / "manifest.json").write_bytes(_canonical(m))
                    return key
                pos += c[2]
    raise AssertionError("no compressed chunk")


def test_damage_that_passes_crc_is_still_named(tmp_path):
    sd = {"w": torch.randn(20_000)}
    shardckpt.save(sd, tmp_path / "c", compression="zstd")
    key = _rewrite(tmp_path / "c", lambda c: None, lambda b: b[:3] + bytes([b[3] ^ 0xFF]) + b[4:])
    with pytest.raises(CorruptCheckpointError, match="does not decode") as ei:
        shardckpt.load({"w": torch.zeros(20_000)}, tmp_path / "c")
    assert ei.value.key == key and ei.value.chunk == 0


def test_flipped_bit_in_compressed_chunk_fails_crc(tmp_path):
    shardckpt.save({"w": torch.randn(20_000)}, tmp_path / "c", compression="zstd")
    (f,) = os.listdir(tmp_path / "c" / "data")
    p = tmp_path / "c" / "data" / f
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC32C"):
        shardckpt.load({"w": torch.zeros(20_000)}, tmp_path / "c")
    with pytest.raises(CorruptCheckpointError):
        shardckpt.verify(tmp_path / "c")


def test_manifest_cannot_declare_huge_chunks(tmp_path):
    # a "decompression bomb" via the manifest: raw_len beyond the chunk size is refused before reading
    shardckpt.save({"w": torch.randn(20_000)}, tmp_path / "c", compression="zstd")

    def bomb(c):
        c[1] = 1 << 40

    _rewrite(tmp_path / "c", bomb)
    with pytest.raises(CorruptCheckpointError, match="exceeds the checkpoint's chunk size"):
        shardckpt.load({"w": torch.zeros(20_000)}, tmp_path / "c")


def test_async_save_with_compression(tmp_path):
    sd = _state()
    with shardckpt.AsyncCheckpointer() as c:
        h = c.async_save(sd, tmp_path / "a", compression="zstd", staging_budget_bytes=64 << 10)
        for v in sd.values():
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
                v.mul_(2)
        h.result()
    out = blank_like(sd, {"n": 0})
    shardckpt.load(out, tmp_path / "a")
    assert_state_equal(out, _state(), bitwise=True)


def test_bad_compression_argument():
    with pytest.raises((ValueError, TypeError)):
        shardckpt.save({"a": torch.ones(1)}, "memory://x/bad", compression="lz4")


def test_auto_default_is_raw_locally_and_zstd_on_object_stores(tmp_path):
    from shardckpt.backends import open_storage
    from shardckpt.backends.fsspec_backend import FsspecStorage
    from shardckpt.io.save_target import default_compression

    sd = {"w": torch.randn(20_000)}
    shardckpt.save(sd, tmp_path / "c")  # default: "auto"
    chunks = json.loads((tmp_path / "c" / "manifest.json").read_text())["body"]["entries"]["w"]["shards"][0]["chunks"]
    assert {c[0] for c in chunks} == {"raw"}
    assert default_compression(open_storage("memory://auto/x")) is None

    class FakeRemoteFs:  # only its protocol is looked at: remote, so zstd
        protocol = ("gcs", "gs")

    remote = FsspecStorage(FakeRemoteFs(), "bucket/x", "gs://bucket/x")
    assert remote.capabilities.remote
    assert default_compression(remote) == shardckpt.Compression()
