"""Fault injection, part 3 of issue 11: random bit flips and byte-range overwrites.

One small checkpoint, raw and compressed, with a few tensors and objects cut into
many chunks (``chunk_bytes=1024``). Its files are held in memory; each case
damages one file (a single-bit flip or an overwrite of a random byte range),
writes it, runs ``verify`` and ``load`` in-process and restores the file. Every
damage must be detected by both, and the error must name the damaged place: the
file, key and chunk for shard data, the manifest for the manifest. Flips are
spread deterministically (a seeded ``random.Random``) over the shard file and
the manifest; every stored byte of a shard file belongs to some chunk, so a
byte no reader uses is counted separately (``unused``) and must be zero too.

A chunk whose CRC matches but that does not decode (a crafted or buggy file)
is covered by ``test_crc_valid_chunk_that_does_not_decode``.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import knobs
from shardckpt.errors import CorruptCheckpointError, ShardckptError
from shardckpt.format.manifest import (
    MANIFEST_NAME,
    BlobRef,
    ChunkInfo,
    Manifest,
    ObjectEntry,
    TensorEntry,
    TensorShard,
    decode_manifest,
    encode_manifest,
)
from shardckpt.native.crc32c import crc32c
from tests.figures import record
from tests.helpers import blank_like, mixed_state, states_equal

CHUNK = 1024
# Cases per (compression, target, kind) in the default run; the slow run adds more.
DEFAULT_CASES = {"bit": 120, "range": 40}
SLOW_CASES = {"bit": 1000, "range": 400}

Place = tuple[str, str, int]  # (file, key, chunk index)


def _state() -> dict:
    return mixed_state(11, w=(64, 32), ints=1000, mod=7, halves=300, step=7, blob=bytes(range(256)) * 12,
                       tup=(1, 2.5, "a"))


def _blank() -> dict:
    return blank_like(_state(), {"step": 0, "blob": b""})


def _same(a: dict, b: dict) -> bool:
    return states_equal(a, b, bitwise=True)


def _blobs(m: Manifest) -> list[tuple[str, BlobRef]]:
    out: list[tuple[str, BlobRef]] = []
    for key, e in m.entries.items():
        if isinstance(e, TensorEntry):
            out += [(key, s.blob) for s in e.shards]
        elif isinstance(e, ObjectEntry) and e.blob is not None:
            out.append((key, e.blob))
    return out


@dataclasses.dataclass
class Ckpt:
    path: Path
    files: dict[str, bytes]  # relative path -> original bytes (the manifest included)
    manifest: Manifest
    spans: dict[str, list[tuple[int, int, Place]]]  # shard file -> stored chunk byte ranges

    def restore(self) -> None:
        for rel, data in self.files.items():
            (self.path / rel).write_bytes(data)


def _build(root: Path, compression: str | None) -> Ckpt:
    path = root / f"ckpt-{compression or 'raw'}"
    with knobs.override(chunk_bytes=CHUNK):
        shardckpt.save(_state(), path, compression=compression,
                       metadata={"note": "caf\u00e9 \u2603", "lr": 1e-7, "betas": [0.9, 0.999]})
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    m = decode_manifest(files[MANIFEST_NAME])
    spans: dict[str, list[tuple[int, int, Place]]] = {f: [] for f in m.files}
    for key, blob in _blobs(m):
        pos = blob.offset
        for i, c in enumerate(blob.chunks):
            spans[blob.file].append((pos, pos + c.stored_len, (blob.file, key, i)))
            pos += c.stored_len
    codecs = {c.codec for _, b in _blobs(m) for c in b.chunks}
    assert codecs == ({"raw"} if compression is None else {"raw", "zstd", "bgz"}), codecs
    assert sum(len(s) for s in spans.values()) >= 20
    return Ckpt(path, files, m, spans)


@pytest.fixture(scope="module", params=[None, "zstd"], ids=["raw", "zstd"])
def ckpt(request, tmp_path_factory) -> Ckpt:
    return _build(tmp_path_factory.mktemp("bitflips"), request.param)


def _damage(rng: random.Random, data: bytes, kind: str, window: tuple[int, int] | None = None) -> tuple[bytes, int, int]:
    """``data`` with one bit flipped or a random range (1..64 bytes) overwritten,
    starting inside ``window`` (default: the whole of ``data``)."""
    buf = bytearray(data)
    a, b = window or (0, len(buf))
    if kind == "bit":
        pos = rng.randrange(a, b)
        buf[pos] ^= 1 << rng.randrange(8)
        return bytes(buf), pos, pos + 1
    lo = rng.randrange(a, b)
    n = rng.randint(1, min(64, len(buf) - lo))
    while True:
        new = rng.randbytes(n)
        if new != data[lo : lo + n]:
            break
    buf[lo : lo + n] = new
    return bytes(buf), lo, lo + n


def _changed_places(ck: Ckpt, rel: str, old: bytes, new: bytes) -> set[Place]:
    return {place for s, e, place in ck.spans[rel] if old[s:e] != new[s:e]}


def _places(err: CorruptCheckpointError) -> set[Place]:
    found = getattr(err, "damaged", None) or [err]
    return {(d.file, d.key, d.chunk) for d in found}


def _is_manifest_error(err: BaseException) -> bool:
    return isinstance(err, CorruptCheckpointError) and str(getattr(err, "file", "")).endswith(MANIFEST_NAME)


def run_cases(ck: Ckpt, target: str, kind: str, n: int, seed: int) -> dict[str, int]:
    rng = random.Random(f"{seed}-{target}-{kind}-{ck.path.name}")
    shard_files = sorted(ck.manifest.files)
    counts = dict(tried=0, detected_verify=0, detected_load=0, unused=0, undetected=0)
    failures: list[str] = []
    try:
        for case in range(n):
            rel = MANIFEST_NAME if target == "manifest" else shard_files[case % len(shard_files)]
            old = ck.files[rel]
            # Shard damage starts in a chunk picked uniformly (small zstd chunks get their share).
            window = None if target == "manifest" else rng.choice(ck.spans[rel])[:2]
            new, lo, hi = _damage(rng, old, kind, window)
            (ck.path / rel).write_bytes(new)
            counts["tried"] += 1
            expected = set() if target == "manifest" else _changed_places(ck, rel, old, new)
            what = f"{target} {kind} case {case}: {rel} bytes [{lo}, {hi})"
            if target == "shard" and not expected:
                counts["unused"] += 1  # damage outside every chunk: load must still be exact
            try:
                shardckpt.verify(ck.path)
            except CorruptCheckpointError as e:
                ok = _is_manifest_error(e) if target == "manifest" else _places(e) == expected
                if ok:
                    counts["detected_verify"] += 1
                else:
                    failures.append(f"{what}: verify named {_places(e)}, expected {expected or 'the manifest'}: {e}")
            else:
                failures.append(f"{what}: verify passed")
            sd = _blank()
            try:
                shardckpt.load(sd, ck.path)
            except CorruptCheckpointError as e:
                place = (e.file, e.key, e.chunk)
                if (target == "manifest" and _is_manifest_error(e)) or place in expected:
                    counts["detected_load"] += 1
                else:
                    failures.append(f"{what}: load named {place}, expected {expected or 'the manifest'}: {e}")
            except ShardckptError as e:
                failures.append(f"{what}: load raised {type(e).__name__}, not CorruptCheckpointError: {e}")
            else:
                counts["undetected"] += 1
                if not _same(sd, _state()):
                    failures.append(f"{what}: load passed with wrong values")
            (ck.path / rel).write_bytes(old)
    finally:
        ck.restore()
    assert not failures, f"{len(failures)} of {n} cases:\n" + "\n".join(failures[:20])
    return counts


def _check_and_record(ck: Ckpt, target: str, kind: str, n: int, seed: int) -> None:
    counts = run_cases(ck, target, kind, n, seed)
    assert counts["tried"] == n
    assert counts["detected_verify"] == counts["detected_load"] == n
    assert counts["undetected"] == counts["unused"] == 0
    record("bit flips", target=target, compression=_compression(ck), kind=kind, **counts)


@pytest.mark.parametrize("kind", ["bit", "range"])
@pytest.mark.parametrize("target", ["shard", "manifest"])
def test_every_flip_is_detected_and_located(ckpt, target, kind):
    _check_and_record(ckpt, target, kind, DEFAULT_CASES[kind], seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bit", "range"])
@pytest.mark.parametrize("target", ["shard", "manifest"])
def test_every_flip_is_detected_and_located_slow(ckpt, target, kind):
    _check_and_record(ckpt, target, kind, SLOW_CASES[kind], seed=1)


def test_every_chunk_is_hit(ckpt):
    """Guards the spread: the default shard cases touch every chunk."""
    rng = random.Random(f"0-shard-bit-{ckpt.path.name}")
    (rel,) = ckpt.manifest.files
    hit = set()
    for _ in range(DEFAULT_CASES["bit"]):
        _, lo, _hi = _damage(rng, ckpt.files[rel], "bit", rng.choice(ckpt.spans[rel])[:2])
        hit |= {p for s, e, p in ckpt.spans[rel] if s <= lo < e}
    assert hit == {p for _, _, p in ckpt.spans[rel]}


def _flip_every_byte(ck: Ckpt, bits: range | None) -> dict[str, int]:
    """Parser level: flip bits of every manifest byte (one random bit per byte, or
    each bit in ``bits``); every flip must be ``CorruptCheckpointError``."""
    data = ck.files[MANIFEST_NAME]
    rng = random.Random(5)
    tried, missed = 0, []
    for pos in range(len(data)):
        for bit in bits if bits is not None else (rng.randrange(8),):
            buf = bytearray(data)
            buf[pos] ^= 1 << bit
            tried += 1
            try:
                decode_manifest(bytes(buf))
            except CorruptCheckpointError:
                pass
            else:
                missed.append((pos, bit, bytes(buf[max(0, pos - 10) : pos + 10])))
    assert not missed, f"{len(missed)} undetected flips: {missed[:10]}"
    return dict(tried=tried, detected_parser=tried, undetected=0)  # decode_manifest only


def test_every_manifest_byte_flip_is_detected(ckpt):
    counts = _flip_every_byte(ckpt, None)
    record("bit flips", target="manifest-parser", compression=_compression(ckpt), kind="bit", **counts)


@pytest.mark.slow
def test_every_manifest_bit_flip_is_detected(ckpt):
    counts = _flip_every_byte(ckpt, range(8))
    record("bit flips", target="manifest-parser", compression=_compression(ckpt), kind="bit", **counts)


def _compression(ck: Ckpt) -> str:
    return "raw" if ck.path.name.endswith("raw") else "zstd"


def test_the_harness_sees_an_undetected_change(tmp_path):
    """The counting must be able to fail: a damage whose CRC is re-sealed in the
    manifest is caught by neither reader, and the harness reports wrong values."""
    ckpt = _build(tmp_path, None)
    rel = next(iter(ckpt.manifest.files))
    key, blob = next((k, b) for k, b in _blobs(ckpt.manifest) if k == "i")
    c0 = blob.chunks[0]
    data = bytearray(ckpt.files[rel])
    data[blob.offset] ^= 1
    resealed = _reseal(ckpt.manifest, key, 0, ChunkInfo(c0.codec, c0.raw_len, c0.stored_len,
                                                         crc32c(bytes(data[blob.offset : blob.offset + c0.stored_len]))))
    try:
        (ckpt.path / rel).write_bytes(bytes(data))
        (ckpt.path / MANIFEST_NAME).write_bytes(encode_manifest(resealed))
        shardckpt.verify(ckpt.path)
        sd = _blank()
        shardckpt.load(sd, ckpt.path)
        assert not _same(sd, _state())
    finally:
        ckpt.restore()


def _reseal(m: Manifest, key: str, index: int, info: ChunkInfo) -> Manifest:
    e = m.entries[key]
    assert isinstance(e, TensorEntry) and len(e.shards) == 1
    s = e.shards[0]
    chunks = list(s.blob.chunks)
    chunks[index] = info
    shard = TensorShard(s.offsets, s.sizes, dataclasses.replace(s.blob, chunks=tuple(chunks)))
    return dataclasses.replace(m, entries={**m.entries, key: dataclasses.replace(e, shards=(shard,))})


def test_crc_valid_chunk_that_does_not_decode(tmp_path):
    """An encoded chunk replaced by bytes that do not decode, with its CRC re-sealed:
    ``verify`` reports exactly that chunk, ``load`` fails naming it."""
    ckpt = _build(tmp_path, "zstd")
    encoded = [(k, b, i, c) for k, b in _blobs(ckpt.manifest) for i, c in enumerate(b.chunks) if c.codec != "raw"]
    assert {c.codec for *_, c in encoded} == {"zstd", "bgz"}
    rng = random.Random(3)
    tried = 0
    try:
        for key, blob, i, c in encoded:
            start = blob.offset + sum(x.stored_len for x in blob.chunks[:i])
            rel = blob.file
            orig = ckpt.files[rel][start : start + c.stored_len]
            variants = [rng.randbytes(c.stored_len), bytes([orig[0] ^ 0x01]) + orig[1:]]
            if c.codec == "bgz":
                variants.append(orig[:1] + bytes([3]) + orig[2:])  # width 3: invalid
            for garbage in variants:
                data = bytearray(ckpt.files[rel])
                data[start : start + c.stored_len] = garbage
                (ckpt.path / rel).write_bytes(bytes(data))
                (ckpt.path / MANIFEST_NAME).write_bytes(
                    encode_manifest(_reseal(ckpt.manifest, key, i, dataclasses.replace(c, crc32c=crc32c(garbage)))))
                with pytest.raises(CorruptCheckpointError, match="does not decode") as ei:
                    shardckpt.verify(ckpt.path)
                assert _places(ei.value) == {(rel, key, i)}
                with pytest.raises(CorruptCheckpointError, match="does not decode") as el:
                    shardckpt.load(_blank(), ckpt.path)
                assert (el.value.file, el.value.key, el.value.chunk) == (rel, key, i)
                tried += 1
    finally:
        ckpt.restore()
    assert tried >= 2 * len(encoded)
    record("bit flips", target="decode", compression="zstd", kind="crc-valid", tried=tried,
           detected_verify=tried, detected_load=tried, undetected=0)


def test_bounded_check_agrees_with_decode():
    """``codec.check`` (what verify runs, streaming) judges damaged chunks exactly as
    ``codec.decode`` (what load runs) does, on bit flips, truncation and extra bytes."""
    import zstandard

    from shardckpt.format import codec

    cfg = codec.Compression()
    g = torch.Generator().manual_seed(2)
    samples = [codec.encode(t.numpy(), isz, cfg, floating=fl) + (t.numel() * t.element_size(),) for t, isz, fl in [
        (torch.randn(2000, generator=g), 4, True),
        (torch.randn(2000, generator=g).to(torch.bfloat16).view(torch.int16), 2, True),
        (torch.arange(3000, dtype=torch.int64) % 7, 8, False),
        (torch.zeros(300_000, dtype=torch.uint8), 1, False),
    ]]
    checked = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(5000))
    samples.append(("zstd", checked, 5000))
    assert {s[0] for s in samples} == {"zstd", "bgz"}
    rng = random.Random(9)

    def verdict(fn, *args) -> bool:
        try:
            fn(*args)
        except codec.CodecError:
            return False
        return True

    disagree = []
    for name, stored, raw_len in samples:
        stored = bytes(stored)
        variants = [stored, stored[:-1], stored + b"\x00", stored[:len(stored) // 2]]
        for _ in range(400):
            b = bytearray(stored)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            variants.append(bytes(b))
        for v in variants:
            for n in (raw_len, raw_len - 1, raw_len + 8):
                a = verdict(codec.decode, name, v, n)
                c = verdict(codec.check, name, v, n)
                if a != c:
                    disagree.append((name, len(v), n, a, c))
        assert verdict(codec.check, name, stored, raw_len)
    assert not disagree, disagree[:10]
