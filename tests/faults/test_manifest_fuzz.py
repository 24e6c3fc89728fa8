"""Manifest fuzzing, part 4 of issue 11: hostile manifests give typed errors only.

Structure-aware: hypothesis starts from a valid manifest document and applies a
few mutations anywhere in it (wrong types, huge or negative numbers, hostile
paths, unicode and empty keys, deep nesting, removed or added fields, duplicate
keys) or meaningful ones (a file path replaced everywhere, overlapping or
out-of-file ranges, dtype/shape/byte-length contradictions, decompression-bomb
sizes). The document is then re-sealed (CRC32C, canonical bytes) so that
validation, not the checksum, must catch it.

- parser level: ``decode_manifest`` alone (pure, fast);
- end-to-end: the fuzzed manifest replaces a real small checkpoint's, then
  ``verify`` and ``load`` into a matching state_dict.

The only exceptions allowed are ``ShardckptError`` subclasses (and not a
``CheckpointReadError`` wrapping some other exception: that hides a defect).
Each example runs under a time bound; the decompression-bomb tests bound memory
with ``tracemalloc`` (Python heap) and ``RLIMIT_AS`` (native allocations).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import resource
import shutil
import signal
import struct
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt import knobs
from shardckpt.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    CorruptCheckpointError,
    ShardckptError,
)
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
from tests.helpers import blank_like, mixed_state

# Reproducible: a fixed seed per test (hypothesis.seed), no example database.
_COMMON = dict(deadline=None, derandomize=False, database=None, print_blob=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
PARSER_DEFAULT, PARSER_SLOW = 400, 10_000
E2E_DEFAULT, E2E_SLOW = 120, 2_000
EXAMPLE_SECONDS = 10  # a hang fails the example instead of stalling the suite


class Hang(Exception):
    pass


@contextlib.contextmanager
def _time_bound(seconds: float):
    def fire(signum, frame):
        raise Hang(f"example ran over {seconds} s")

    if threading.current_thread() is not threading.main_thread():  # signals need the main thread
        yield
        return
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- documents


def _canonical(doc) -> bytes:
    """The codec's canonical bytes, written here with json.dumps so that a ``DupDict``
    can smuggle duplicate keys in (the codec itself refuses anything but plain
    values); ``test_reseal_helpers_are_sound`` checks both agree on plain documents."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class DupDict(dict):
    """Serializes with a duplicated key (json.dumps asks a dict subclass for items())."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs

    def items(self):  # type: ignore[override]
        return [_KeyOrdered(p) for p in self.pairs]


class _KeyOrdered(tuple):
    """A (key, value) pair that sorts by key only (json sorts items; values may not compare)."""

    def __lt__(self, other):  # type: ignore[override]
        return self[0] < other[0]


def reseal(doc: dict) -> bytes:
    """The document's canonical bytes with a matching CRC32C."""
    body = {k: v for k, v in doc.items() if k != "crc32c"}
    sealed = {**body, "crc32c": f"{crc32c(_canonical(body)):08x}"}
    return _canonical(sealed)


def _synthetic() -> bytes:
    f = "data/abc-r00000.bin"
    blob = BlobRef(f, 0, (ChunkInfo("raw", 16, 16, 123), ChunkInfo("zstd", 8, 6, 0xFFFFFFFF)))
    entries = {
        "w": TensorEntry("float32", (3, 2), (TensorShard((0, 0), (3, 2), blob),), ("model", "w")),
        "step": ObjectEntry("json", ("step",), value={"a": [1, 2.5, None]}),
        "blob": ObjectEntry("bytes", ("blob",), blob=BlobRef(f, 22, (ChunkInfo("raw", 2, 2, 5),))),
    }
    return encode_manifest(Manifest(save_id="abc", world_size=2, created_unix=1.5, chunk_bytes=64, files={f: 30},
                                    entries=entries, library={"torch": "x"}, metadata={"note": "caf\u00e9"}))


SYNTHETIC = json.loads(_synthetic())

_PATHS = ["../x.bin", "data/../../x.bin", "data/../manifest.json", "/etc/passwd", "data//x", "data/./x", "data",
          "data/", "C:/x", "data\\x", "s3://b/x", "data/x\x00", "", ".", "data/\u00e9\u202e", "data/" + "a" * 300,
          "data/x.bin/..", "~/x", "data/x:y"]
_INTS = [0, 1, -1, 7, 2**31 - 1, 2**31, 2**32, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63), 10**400]
_STRINGS = ["", "raw", "zstd", "bgz", "lz4", "tensor", "object", "json", "bytes", "torch", "pickle", "float32",
            "bfloat16", "int64", "bool", "object", "complex32", "\u00e9", "\ud7ff", "\u0000", "nan", "Infinity"]


def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


scalars = st.one_of(
    st.sampled_from(_INTS), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.none(), st.sampled_from(_STRINGS + _PATHS), st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=12,
) | st.integers(50, 400).map(_nested)


def _containers(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every container in the document."""
    # A DupDict serializes its own pairs: not a target itself, but its children are
    # shared with those pairs and may be mutated.
    out = [] if isinstance(node, DupDict) else [path]
    items = dict.items(node) if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            out += _containers(v, path + (k,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _blob_nodes(doc: dict) -> list[dict]:
    out = []
    for e in doc["body"]["entries"].values():
        if isinstance(e, dict):
            shards = e.get("shards")
            out += [s for s in shards if isinstance(s, dict)] if isinstance(shards, list) else []
            if "file" in e:
                out.append(e)
    return out


@st.composite
def mutation(draw, doc: dict) -> None:
    """Apply one mutation to ``doc`` in place."""
    kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "insert", "dup", "rename_file",
                                 "range", "bomb", "shape", "dtype"]))
    body = doc.get("body") if isinstance(doc.get("body"), dict) else None
    if kind in ("rename_file", "range", "bomb", "shape", "dtype") and body is not None \
            and isinstance(body.get("entries"), dict) and isinstance(body.get("files"), dict):
        blobs = _blob_nodes(doc)
        if kind == "rename_file" and body["files"]:
            new = draw(st.sampled_from(_PATHS) | st.text(max_size=8).map(lambda s: "data/" + s))
            old = draw(st.sampled_from(sorted(body["files"])))
            body["files"] = {new if k == old else k: v for k, v in body["files"].items()}
            for b in blobs:
                if b.get("file") == old:
                    b["file"] = new
            return
        if kind == "range" and blobs:
            b = draw(st.sampled_from(blobs))
            b["offset"] = draw(st.sampled_from([-1, 0, 1, 2**40, 2**64]) | st.integers(0, 40_000))
            return
        tensors = [e for e in body["entries"].values() if isinstance(e, dict) and e.get("kind") == "tensor"
                   and isinstance(e.get("shards"), list) and e["shards"] and isinstance(e["shards"][0], dict)]
        if tensors:
            e = draw(st.sampled_from(tensors))
            s = e["shards"][0]
            if kind == "bomb":  # consistent but huge: a small stored chunk claiming many bytes
                n = draw(st.sampled_from([2**20, 2**31, 2**40, 2**62]))
                chunks = s.get("chunks") if isinstance(s.get("chunks"), list) else []
                first = chunks[0] if chunks and isinstance(chunks[0], list) and len(chunks[0]) == 4 else ["raw", 1, 1, 0]
                body["chunk_bytes"] = n
                e.update(dtype="uint8", shape=[n])
                s.update(offsets=[0], sizes=[n], chunks=[[draw(st.sampled_from(["zstd", "bgz"])), n, first[2], first[3]]])
                return
            if kind == "shape":
                field = draw(st.sampled_from(["shape", "sizes", "offsets"]))
                dims = draw(st.lists(st.sampled_from(_INTS) | st.integers(0, 70), max_size=70))
                (e if field == "shape" else s)[field] = dims
                return
            if kind == "dtype":
                e["dtype"] = draw(st.sampled_from(["uint8", "bool", "float64", "bfloat16", "complex128", "float8_e5m2"]))
                return
        kind = "replace"
    paths = _containers(doc)
    path = draw(st.sampled_from(paths))
    node = _get(doc, path)
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if kind == "insert" or not keys:
        if isinstance(node, dict):
            node[draw(st.sampled_from(["", "\u00e9", "kind", "file", "value", "chunks", "x"]) | st.text(max_size=4))] = draw(values)
        else:
            node.insert(draw(st.integers(0, len(node))), draw(values))
        return
    key = draw(st.sampled_from(keys))
    if kind == "delete":
        del node[key]
    elif kind == "dup" and isinstance(node, dict) and path:
        parent = _get(doc, path[:-1])
        parent[path[-1]] = DupDict([(key, draw(values)), *node.items()])
    else:
        node[key] = draw(values)


@st.composite
def fuzzed(draw, base: dict) -> bytes:
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        draw(mutation(doc))
    if draw(st.integers(0, 19)) == 7:
        return draw(st.binary(max_size=64)) if draw(st.booleans()) else _canonical(doc)  # garbage or stale CRC
    return reseal(doc)


def _only_typed(fn, what: str) -> Any:
    try:
        with _time_bound(EXAMPLE_SECONDS):
            return fn()
    except CheckpointReadError as e:
        # An OS error reading a path is I/O; anything else wrapped is a defect hidden.
        if e.__cause__ is not None and not isinstance(e.__cause__, (ShardckptError, OSError)):
            raise AssertionError(f"{what}: CheckpointReadError wraps {type(e.__cause__).__name__}: {e}") from e
    except ShardckptError:
        pass
    return None


# ---------------------------------------------------------------- parser level


def _parser_case(data: bytes, counter: list[int]) -> None:
    counter[0] += 1
    m = _only_typed(lambda: decode_manifest(data), "decode_manifest")
    if m is not None:  # accepted: then what it says must be self-consistent
        for e in m.entries.values():
            blobs = [s.blob for s in e.shards] if isinstance(e, TensorEntry) else [e.blob] if e.blob else []
            for b in blobs:
                assert b.offset + b.stored_len <= m.files[b.file]
                assert all(c.raw_len <= m.chunk_bytes for c in b.chunks)


def _parser_test(n: int, seed_: int):
    counter = [0]

    @seed(seed_)
    @settings(max_examples=n, **_COMMON)
    @given(st.data())
    def run(data):
        _parser_case(data.draw(fuzzed(SYNTHETIC)), counter)

    run()
    # hypothesis discards examples it cannot draw: most of the budget must still have run
    assert counter[0] >= n // 2, f"only {counter[0]} of {n} parser examples ran"
    record("manifest fuzz", level="parser", examples=counter[0], untyped=0)


def test_fuzz_parser():
    _parser_test(PARSER_DEFAULT, 0)


@pytest.mark.slow
@pytest.mark.parametrize("part", [1, 2])  # two halves, so xdist runs them in parallel
def test_fuzz_parser_slow(part):
    _parser_test(PARSER_SLOW // 2, part)


def test_mutations_reach_the_validator():
    """The harness can fail: resealed mutations get past the CRC and are judged by
    validation (most rejected with a reason other than the checksum)."""
    reasons: dict[str, int] = {}

    @seed(3)
    @settings(max_examples=150, **_COMMON)
    @given(st.data())
    def run(data):
        doc = copy.deepcopy(SYNTHETIC)
        draw = data.draw
        draw(mutation(doc))
        try:
            decode_manifest(reseal(doc))
        except CorruptCheckpointError as e:
            reason = "crc" if "CRC32C mismatch" in str(e) or "canonical" in str(e) else "validation"
            reasons[reason] = reasons.get(reason, 0) + 1

    run()
    assert reasons.get("crc", 0) == 0 and reasons.get("validation", 0) > 50, reasons


# ---------------------------------------------------------------- end to end


def _state() -> dict:
    return mixed_state(4, w=(16, 16), ints=300, mod=5, halves=40, step=3, blob=b"\x01" * 700, tup=(1, "a"))


def _blank() -> dict:
    return blank_like(_state(), {"step": 0, "blob": b""})


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for comp in (None, "zstd"):
        path = tmp_path_factory.mktemp("fuzz") / f"ckpt-{comp or 'raw'}"
        with knobs.override(chunk_bytes=512):
            shardckpt.save(_state(), path, compression=comp, metadata={"note": "x"})
        out[comp or "raw"] = (path, json.loads((path / MANIFEST_NAME).read_bytes()))
    return out


def _e2e_runner(path: Path, doc: dict, n: int, counter: list[int], seed_: int):
    @seed(seed_)
    @settings(max_examples=n, **_COMMON)
    @given(st.data())
    def run(data):
        counter[0] += 1
        (path / MANIFEST_NAME).write_bytes(data.draw(fuzzed(doc)))
        _only_typed(lambda: shardckpt.verify(path), "verify")
        _only_typed(lambda: shardckpt.load(_blank(), path), "load")

    return run


def _e2e_test(real, n: int, seed_: int) -> None:
    counter = [0]
    for path, doc in real.values():
        original = (path / MANIFEST_NAME).read_bytes()
        try:
            _e2e_runner(path, doc, n // 2, counter, seed_)()
        finally:
            (path / MANIFEST_NAME).write_bytes(original)
        shardckpt.verify(path)
    assert counter[0] >= n // 2, f"only {counter[0]} of {n} end-to-end examples ran"
    record("manifest fuzz", level="end-to-end", examples=counter[0], untyped=0)


def test_fuzz_end_to_end(real):
    _e2e_test(real, E2E_DEFAULT, 0)


@pytest.mark.slow
def test_fuzz_end_to_end_slow(real):
    _e2e_test(real, E2E_SLOW, 1)


# ---------------------------------------------------------------- memory bounds


def _zstd_rle_frame(content: int, blocks: int, window_log: int = 20) -> bytes:
    """A zstd frame declaring ``content`` bytes, made of ``blocks`` RLE blocks of 128 KiB
    (hand-built: a real encoder would take seconds to write a GiB of zeros)."""
    header = struct.pack("<IBB", 0xFD2FB528, 0xC0, (window_log - 10) << 3) + struct.pack("<Q", content)
    out = [header]
    for i in range(blocks):
        last = i == blocks - 1
        out.append(struct.pack("<I", int(last) | 1 << 1 | (128 << 10) << 3)[:3] + b"\x00")
    return b"".join(out)


def _bomb_dir(root: Path, claim: int, frame: bytes) -> Path:
    path = root / f"bomb-{claim}-{len(frame)}"
    shutil.rmtree(path, ignore_errors=True)
    (path / "data").mkdir(parents=True)
    rel = "data/bomb-r00000.bin"
    (path / rel).write_bytes(frame)
    blob = BlobRef(rel, 0, (ChunkInfo("zstd", claim, len(frame), crc32c(frame)),))
    m = Manifest(save_id="bomb", world_size=1, created_unix=1.0, chunk_bytes=claim, files={rel: len(frame)},
                 entries={"z": TensorEntry("uint8", (claim,), (TensorShard((0,), (claim,), blob),), ("z",))})
    (path / MANIFEST_NAME).write_bytes(encode_manifest(m))
    return path


@contextlib.contextmanager
def _native_memory_bound(extra: int):
    """Native allocations beyond ``extra`` bytes of address space fail (MemoryError)
    instead of paging the machine to death."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _peak_python_bytes(fn) -> int:
    tracemalloc.start()
    try:
        with _native_memory_bound(1 << 30):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("claim,blocks,valid", [
    (2**33, 3, False),  # a tiny frame claiming 8 GiB, truncated
    (2**30, 2**13, True),  # a real 1 GiB bomb: 32 KiB of RLE blocks that decode to 1 GiB of zeros
])
def test_decompression_bomb_is_checked_in_bounded_memory(tmp_path, claim, blocks, valid):
    """Regression: verify allocated ``raw_len`` bytes (twice) before decoding a chunk."""
    frame = _zstd_rle_frame(claim, blocks)
    path = _bomb_dir(tmp_path, claim, frame)

    def run():
        if valid:
            assert shardckpt.verify(path).chunks == 1
        else:
            with pytest.raises(CorruptCheckpointError, match="does not decode") as ei:
                shardckpt.verify(path)
            assert (ei.value.key, ei.value.chunk) == ("z", 0)

    peak = _peak_python_bytes(run)
    assert peak <= 2 * len(frame) + (4 << 20), f"verify held {peak} bytes for a {len(frame)}-byte file"
    # A load into a state_dict of the real size is a mismatch, found before any read.
    with pytest.raises(CheckpointMismatchError):
        shardckpt.load({"z": torch.zeros(16, dtype=torch.uint8)}, path)


def test_huge_shape_and_chunk_claims_are_rejected_without_allocating():
    doc = copy.deepcopy(SYNTHETIC)
    w = doc["body"]["entries"]["w"]
    doc["body"]["chunk_bytes"] = 2**62
    w.update(shape=[2**31, 2**31])
    w["shards"][0].update(sizes=[2**31, 2**31])
    w["shards"][0]["chunks"][1][1] = 2**62
    data = reseal(doc)
    peak = _peak_python_bytes(lambda: pytest.raises(CorruptCheckpointError, decode_manifest, data))
    assert peak <= 2 * len(data) + (1 << 20)


def test_reseal_helpers_are_sound(real):
    """The fuzz helpers make manifests the reader accepts when nothing is mutated."""
    for path, doc in real.values():
        assert reseal(doc) == (path / MANIFEST_NAME).read_bytes()
    assert decode_manifest(reseal(SYNTHETIC)) == decode_manifest(_synthetic())
    dup = copy.deepcopy(SYNTHETIC)
    dup["body"]["metadata"] = DupDict([("note", 1), ("note", "caf\u00e9")])
    with pytest.raises(CorruptCheckpointError, match="duplicate"):
        decode_manifest(reseal(dup))
    assert dataclasses.is_dataclass(decode_manifest(reseal(SYNTHETIC)))


def test_path_through_a_shard_file_is_corruption(real):
    path, doc = real["raw"]
    original = (path / MANIFEST_NAME).read_bytes()
    doc = copy.deepcopy(doc)
    (old,) = doc["body"]["files"]
    new = old + "/x"
    doc["body"]["files"] = {new: doc["body"]["files"][old]}
    for b in _blob_nodes(doc):
        b["file"] = new
    try:
        (path / MANIFEST_NAME).write_bytes(reseal(doc))
        with pytest.raises(CorruptCheckpointError):
            shardckpt.verify(path)
        with pytest.raises(CorruptCheckpointError):
            shardckpt.load(_blank(), path)
    finally:
        (path / MANIFEST_NAME).write_bytes(original)
