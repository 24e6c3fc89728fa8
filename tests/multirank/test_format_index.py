"""Manifest version 2: grid layouts and per-rank indexes (format/grid.py, format/index.py).

Grid arithmetic is checked against a brute-force scan; layouts and indexes made
by a real 2-rank save are damaged in every way a file can be (bytes flipped,
truncated, missing, swapped, or rewritten consistently with a lie) and every
case must be a typed error naming the file, from ``load`` and from ``verify``.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt.errors import CorruptCheckpointError
from shardckpt.format.grid import Grid, LayoutError, Writers, detect_layout
from shardckpt.format.jsoncodec import encode as canonical_json
from shardckpt.format.manifest import encode_manifest
from shardckpt.native.crc32c import crc32c
from shardckpt.store import CheckpointDir
from tests.multiproc import run_multiprocess


def _random_grid(rng: random.Random) -> tuple[tuple[int, ...], Grid]:
    shape = tuple(rng.randint(1, 17) for _ in range(rng.randint(1, 3)))
    cuts = []
    for n in shape:
        inner = sorted(rng.sample(range(1, n), rng.randint(0, min(4, n - 1)))) if n > 1 else []
        if rng.random() < 0.4:  # a regular (block) dim
            b = rng.randint(1, n)
            inner = list(range(b, n, b))
        cuts.append([0, *inner, n])
    return shape, Grid.make(cuts)


def test_grid_overlapping_matches_a_scan_and_round_trips():
    rng = random.Random(7)
    for _ in range(1500):
        shape, g = _random_grid(rng)
        assert Grid.from_json(g.to_json(), shape) == g
        boxes = [g.box(j) for j in range(g.num_boxes)]
        assert sum(int(np.prod(s)) for _, s in boxes) == int(np.prod(shape))  # a tiling
        lo = tuple(rng.randint(0, n - 1) for n in shape)
        size = tuple(rng.randint(1, n - o) for n, o in zip(shape, lo))
        scan = [j for j, (o, s) in enumerate(boxes)
                if all(a < b + m and b < a + n for a, n, b, m in zip(o, s, lo, size))]
        assert sorted(g.overlapping(lo, size)) == scan, (g, lo, size)
        # detect_layout finds the same grid from the boxes in any order
        perm = rng.sample(range(len(boxes)), len(boxes))
        off = np.array([boxes[p][0] for p in perm])
        siz = np.array([boxes[p][1] for p in perm])
        layout, order = detect_layout(shape, off, siz, np.zeros(len(perm), dtype=np.int64))
        assert layout.grid == g and list(order) == perm


@pytest.mark.parametrize("doc, why", [
    ([[0, 2, 4]], "block size"),          # regular cuts must be written as a block
    ([[0, 3, 3, 4]], "rise strictly"),
    ([[0, 5]], "rise strictly"),          # does not end at the size (4)
    ([0], "block 0"),
    ([True], "expected a block"),
    ([2, 2], "one cut spec per dimension"),
])
def test_grid_rejects_non_canonical_or_invalid(doc, why):
    with pytest.raises(LayoutError, match=why):
        Grid.from_json(doc, (4,))


def test_writers_encodings():
    assert Writers.of_array(np.array([3, 3, 3])).to_json() == 3
    assert Writers.of_array(np.array([1, 2, 3])).to_json() == {"first": 1, "step": 1}
    assert Writers.of_array(np.array([2, 0, 1])).to_json() == [2, 0, 1]
    with pytest.raises(LayoutError, match="canonical"):
        Writers.from_json([1, 2, 3], 3, 8)  # affine written as a list
    with pytest.raises(LayoutError, match="not a rank"):
        Writers.from_json({"first": 6, "step": 1}, 3, 8)  # box 2 -> rank 8
    with pytest.raises(LayoutError, match="not a rank"):
        Writers.from_json(-1, 3, 8)


def _save_worker(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    with shardckpt.knobs.override(chunk_bytes=64):
        shardckpt.save({"w": distribute_tensor(_full(), mesh, [Shard(0)], src_data_rank=None),
                        "b": torch.arange(4.0)}, path)


def _full() -> torch.Tensor:
    return torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("v2") / "c"
    run_multiprocess(_save_worker, 2, str(path))
    return path


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "c"
    shutil.copytree(saved, dst)
    return dst


def _load(path):
    out = {"w": torch.zeros(12, 5), "b": torch.zeros(4)}
    shardckpt.load(out, path)
    return out


def test_v2_layout_loads_and_verifies(saved):
    doc = json.loads((saved / "manifest.json").read_text())
    assert doc["version"] == 2 and doc["body"]["entries"]["w"]["layout"] == {
        "grid": [6, 5], "writers": {"first": 0, "step": 1}}
    assert "shards" in doc["body"]["entries"]["b"]  # a whole tensor stays listed
    out = _load(saved)
    assert torch.equal(out["w"], _full()) and torch.equal(out["b"], torch.arange(4.0))
    report = shardckpt.verify(saved)
    assert report.chunks == 2 * (6 * 5 * 4 // 64 + 1) + 1


def _index(path, rank):
    m = CheckpointDir.at(path).read_manifest()
    return path / m.indexes[rank][0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "swap"])
def test_damaged_index_is_a_typed_error_naming_it(saved, tmp_path, damage):
    path = _copy(saved, tmp_path)
    idx1, idx0 = _index(path, 1), _index(path, 0)
    data = bytearray(idx1.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x04
        idx1.write_bytes(bytes(data))
    elif damage == "truncate":
        idx1.write_bytes(bytes(data[:-3]))
    elif damage == "missing":
        idx1.unlink()
    else:  # rank 0's index where rank 1's should be
        idx1.write_bytes(idx0.read_bytes())
    with pytest.raises(CorruptCheckpointError) as e:
        _load(path)
    assert e.value.file == idx1.relative_to(path).as_posix(), str(e.value)
    with pytest.raises(CorruptCheckpointError) as v:
        shardckpt.verify(path)
    assert any(d.file == idx1.relative_to(path).as_posix() for d in v.value.damaged), str(v.value)


def _rewrite_index(path, rank, edit):
    """Edit rank's index and make the manifest consistent with it (a lie, not damage)."""
    ckpt = CheckpointDir.at(path)
    m = ckpt.read_manifest()
    rel, _ = m.indexes[rank]
    doc = json.loads((path / rel).read_text())
    edit(doc)
    data = canonical_json(doc)
    (path / rel).write_bytes(data)
    m2 = dataclasses.replace(m, indexes={**m.indexes, rank: (rel, crc32c(data))},
                             files={**m.files, rel: len(data)})
    (path / "manifest.json").write_bytes(encode_manifest(m2))


@pytest.mark.parametrize("edit, why", [
    (lambda d: d["items"][0].__setitem__(1, 0), "written by rank 0"),       # claims rank 0's box
    (lambda d: d["items"].pop(), "assigns rank 1"),                          # a slice missing
    (lambda d: d["items"][0].__setitem__(3, 10**6), "exceed"),               # past the file's end
    (lambda d: d["items"][0][4].__setitem__(0, [65, 1]), "chunks hold|chunk size"),
    (lambda d: d.__setitem__("rank", 0), "not rank 1's"),
    (lambda d: d["files"].__setitem__(0, "data/other.bin"), "not listed"),
    (lambda d: d["items"][0].__setitem__(0, 99), "out of range"),
])
def test_lying_index_is_rejected(saved, tmp_path, edit, why):
    path = _copy(saved, tmp_path)
    _rewrite_index(path, 1, edit)
    with pytest.raises(CorruptCheckpointError, match=why):
        _load(path)
