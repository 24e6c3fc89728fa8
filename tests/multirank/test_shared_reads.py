"""Read once, share over the process group (``shardckpt/dcp/_shared_reads.py``).

Planning is tested without processes; loads run in real gloo ranks. Storage reads
are counted by ``count://`` (local files, really read, bytes counted per process)
or, on S3 (moto), by ``fault://`` wrapping the S3 backend unarmed (it counts every
read): a replicated piece must come from storage once in all, not once per rank.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import shardckpt
from shardckpt import knobs
from shardckpt.backends import register_backend
from shardckpt.backends.local import LocalStorage
from shardckpt.io.shared_reads import RankInfo, SharedPlan, plan_shared_reads
from tests.helpers import assert_state_equal, blank_like
from tests.multiproc import run_multiprocess

# ----------------------------------------------------------------------------- counting backend

_read: Counter[str] = Counter()  # shard file -> bytes read from storage, in this process
_read_lock = threading.Lock()


class _CountingReader:
    def __init__(self, inner: Any, rel: str) -> None:
        self._inner, self._rel = inner, rel

    def size(self) -> int:
        return self._inner.size()

    def read_into(self, offset: int, out: memoryview) -> None:
        if self._rel.endswith(".bin"):  # shard data (not a format's side files)
            with _read_lock:
                _read[self._rel] += out.nbytes
        self._inner.read_into(offset, out)

    def close(self) -> None:
        self._inner.close()


class CountingStorage(LocalStorage):
    """Local files, every ranged read counted; ``remote=True`` declares the backend remote
    (as an object store would), so ``shared_reads="auto"`` turns sharing on."""

    def __init__(self, root: str, remote: bool = False) -> None:
        super().__init__(root)
        self.url = ("countremote://" if remote else "count://") + self.root
        if remote:
            self.capabilities = replace(LocalStorage.capabilities, remote=True)

    def open_reader(self, rel: str) -> Any:
        return _CountingReader(super().open_reader(rel), rel)

    def child(self, rel: str) -> CountingStorage:
        return CountingStorage(self._p(rel), self.capabilities.remote)


def _install() -> None:
    register_backend("count", lambda url, o: CountingStorage(url[len("count://"):]), replace=True)
    register_backend("countremote", lambda url, o: CountingStorage(url[len("countremote://"):], True),
                     replace=True)


def _reads_everywhere() -> int:
    """Bytes every rank read from storage since the last call (summed over ranks)."""
    with _read_lock:
        mine = sum(_read.values())
        _read.clear()
    t = torch.tensor([mine], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def _nbytes(sd: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------- planning (no processes)


def _item(key: str, lengths: tuple[int, ...], storage_offsets: tuple[int, ...] | None = None) -> ReadItem:
    zero = torch.Size([0] * len(lengths))
    so = torch.Size(storage_offsets) if storage_offsets is not None else zero
    return ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(key, so), dest_offsets=zero,
                    storage_index=MetadataIndex(key, zero), storage_offsets=so, lengths=torch.Size(lengths))


def _plans(items_per_rank: list[list[ReadItem]], members: int = 7) -> list[LoadPlan]:
    n = len(items_per_rank)
    return [LoadPlan(items, storage_data=RankInfo(r, n, members, r)) for r, items in enumerate(items_per_rank)]


_SIZES = {"a": (1000,), "b": (600,), "c": (300,), "d": (100,), "s": (90,)}


def _plan(plans: list[LoadPlan], piece_bytes: int = 1 << 20) -> list[LoadPlan]:
    return plan_shared_reads(plans, lambda k: "float32" if k in _SIZES else None,
                             lambda it: _SIZES[it.storage_index.fqn], piece_bytes)


def test_replicas_are_spread_over_ranks_by_bytes_in_one_order():
    keys = ["a", "b", "c", "d"]
    out = _plan(_plans([[_item(k, _SIZES[k]) for k in keys] for _ in range(3)]))
    shared = [p.storage_data for p in out]
    assert all(isinstance(s, SharedPlan) for s in shared)
    assert shared[0].transfers == shared[1].transfers == shared[2].transfers  # one order everywhere
    owners = {t.key[0]: t.owner for t in shared[0].transfers}
    assert sorted(owners) == keys
    load = Counter()
    for t in shared[0].transfers:
        load[t.owner] += sum(t.sizes)
    assert load == {0: 4000, 1: 2400, 2: 1600}  # greedy, largest first: a | b | c then d
    assert all(t.ranks == (0, 1, 2) for t in shared[0].transfers)


def test_what_a_rank_reads_anyway_counts_for_balance():
    # rank 0 reads a large unshared slice: the shared one goes to rank 1
    plans = _plans([[_item("a", (1000,)), _item("c", (300,))], [_item("c", (300,))]])
    (t,) = _plan(plans)[0].storage_data.transfers
    assert t.key[0] == "c" and t.owner == 1


def test_only_exact_duplicates_are_shared_and_a_subset_goes_to_its_ranks_only():
    plans = _plans([
        [_item("s", (45,), (0,)), _item("d", (100,))],
        [_item("s", (45,), (45,)), _item("d", (100,))],  # other half of s: not a duplicate
        [_item("s", (45,), (45,))],
    ])
    out = _plan(plans)
    by_rank = [{t.key[0]: t for t in p.storage_data.transfers} if p.storage_data else {} for p in out]
    assert set(by_rank[0]) == {"d"} and by_rank[0]["d"].ranks == (0, 1)
    assert set(by_rank[1]) == {"d", "s"} and by_rank[1]["s"].ranks == (1, 2)
    assert set(by_rank[2]) == {"s"}  # rank 2 takes no part in "d"


def test_pieces_are_bounded_by_the_coordinators_piece_bytes():
    (t,) = _plan(_plans([[_item("a", (1000,))]] * 2), piece_bytes=1024)[0].storage_data.transfers
    assert sum(t.sizes) == 4000 and max(t.sizes) <= 1024 and len(t.pieces) == 4


def test_nothing_is_shared_when_the_groups_disagree_or_on_one_rank():
    items = [[_item("a", (1000,))]] * 2
    for plans in (
        [LoadPlan(i) for i in items],  # no RankInfo (another reader's plans)
        [LoadPlan(items[0], storage_data=RankInfo(0, 2, 7, 0)), LoadPlan(items[1], storage_data=RankInfo(1, 2, 8, 1))],
        [LoadPlan(items[0], storage_data=RankInfo(0, 4, 7, 0)), LoadPlan(items[1], storage_data=RankInfo(1, 4, 7, 1))],
        [LoadPlan(items[0], storage_data=RankInfo(1, 2, 7, 0)), LoadPlan(items[1], storage_data=RankInfo(0, 2, 7, 1))],
        _plans(items[:1]),
    ):
        assert all(p.storage_data is None for p in _plan(plans))


def test_a_damaged_entry_is_not_shared():
    plans = _plans([[_item("zz", (10,)), _item("a", (1000,))]] * 2)
    (t,) = _plan(plans)[0].storage_data.transfers  # "zz" is not in the checkpoint
    assert t.key[0] == "a"


def test_knob_choices_and_environment(monkeypatch):
    with knobs.override(shared_reads="on") as k:
        assert k.shared_reads == "on"
    with pytest.raises(ValueError, match="shared_reads"):
        with knobs.override(shared_reads="sometimes"):
            pass
    monkeypatch.setenv("SHARDCKPT_SHARED_READS", "OFF")
    assert knobs.Knobs.from_env().shared_reads == "off"
    monkeypatch.setenv("SHARDCKPT_SHARED_READS", "maybe")
    with pytest.raises(ValueError, match="SHARDCKPT_SHARED_READS"):
        knobs.Knobs.from_env()


def test_single_process_load_is_unchanged(tmp_path):
    _install()
    sd = {"w": torch.randn(1000), "step": 3}
    url = f"count://{tmp_path}/ck"
    shardckpt.save(sd, url)
    out = {"w": torch.zeros(1000), "step": 0}
    _read.clear()
    with knobs.override(shared_reads="on"):
        shardckpt.load(out, url)
    assert torch.equal(out["w"], sd["w"]) and out["step"] == 3
    assert sum(_read.values()) == 4000


# ----------------------------------------------------------------------------- real ranks


def _ddp_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(3000, generator=g), "w2": torch.randn(40, 50, generator=g).to(torch.bfloat16),
            "b": torch.randint(0, 1 << 30, (777,), generator=g), "scalar": torch.tensor(2.5),
            "mask": torch.rand(123, generator=g) > 0.5, "step": 11}


def _ddp_worker(rank: int, world: int, root: str) -> None:
    _install()
    sd = _ddp_state()  # the same on every rank: DDP replicas
    url = f"count://{root}/ck"
    with knobs.override(chunk_bytes=1024, max_read_bytes=4096):  # several chunks and pieces
        shardckpt.save(sd, url, compression=None)
        _reads_everywhere()
        for mode, times in (("on", 1), ("off", world), ("on", 1)):
            out = blank_like(sd)
            with knobs.override(shared_reads=mode):
                shardckpt.load(out, url)
            assert_state_equal(out, sd)
            assert _reads_everywhere() == times * _nbytes(sd), mode


def test_ddp_replicas_load_bitwise_and_each_piece_is_read_once(tmp_path):
    run_multiprocess(_ddp_worker, 2, str(tmp_path))


@pytest.mark.slow
def test_ddp_replicas_on_three_ranks(tmp_path):
    run_multiprocess(_ddp_worker, 3, str(tmp_path))


def _replicate_worker(rank: int, world: int, root: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    _install()
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(5000, dtype=torch.float64).reshape(100, 50)
    sd = {"r": distribute_tensor(full, mesh, [Replicate()]), "plain": torch.arange(999)}
    url = f"countremote://{root}/ck"  # remote: "auto" shares
    # chunks and pieces at row boundaries (10 and 20 rows): each stored byte is read once
    with knobs.override(chunk_bytes=4000, max_read_bytes=8000):
        shardckpt.save(sd, url, compression=None)
        _reads_everywhere()
        out = {"r": distribute_tensor(torch.zeros(100, 50, dtype=torch.float64), mesh, [Replicate()]),
               "plain": torch.zeros(999, dtype=torch.int64)}
        shardckpt.load(out, url)
        assert_state_equal(out, sd)
        assert _reads_everywhere() == _nbytes({"r": full, "plain": sd["plain"]})
        # Through DCP with our reader and its default planner (DCP's default group)
        out = {"r": distribute_tensor(torch.zeros(100, 50, dtype=torch.float64), mesh, [Replicate()]),
               "plain": torch.zeros(999, dtype=torch.int64)}
        dcp.load(out, storage_reader=shardckpt.ShardckptReader(url))
        assert_state_equal(out, sd)
        assert _reads_everywhere() == _nbytes({"r": full, "plain": sd["plain"]})
        # A local backend with "auto": every rank reads what it loads
        local = f"count://{root}/ck"
        out["plain"].zero_()
        shardckpt.load(out, local)
        assert_state_equal(out, sd)
        assert _reads_everywhere() == world * _nbytes({"r": full, "plain": sd["plain"]})


def test_replicate_dtensor_through_load_and_dcp_load(tmp_path):
    run_multiprocess(_replicate_worker, 2, str(tmp_path))


def _save_mixed(rank: int, world: int, root: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    _install()
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(120 * 9, dtype=torch.float32).reshape(120, 9)
    sd = {"t": distribute_tensor(full, mesh, [Shard(0)]), "rep": torch.arange(2000) * 3,
          "only01": torch.arange(500.0), "cfg": {"lr": 0.5}}
    with knobs.override(chunk_bytes=720):  # 20 rows of t
        shardckpt.save(sd, f"count://{root}/ck", compression=None)


def _load_mixed(rank: int, world: int, root: str) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    _install()
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(120 * 9, dtype=torch.float32).reshape(120, 9)
    want = {"t": full, "rep": torch.arange(2000) * 3, "only01": torch.arange(500.0)}
    for placement in (Shard(0), Replicate()):
        out: dict[str, Any] = {"t": distribute_tensor(torch.zeros(120, 9), mesh, [placement]),
                               "rep": torch.zeros(2000, dtype=torch.int64), "cfg": {"lr": 0.0}}
        if rank < 2:  # a key only some ranks load: sent to those ranks only
            out["only01"] = torch.zeros(500)
        # pieces of 20 rows, like the chunks: each stored byte is read once
        with knobs.override(shared_reads="on", max_read_bytes=720):
            shardckpt.load(out, f"count://{root}/ck", strict=False)
        local = out["t"].to_local()
        expected = distribute_tensor(full, mesh, [placement]).to_local()
        assert torch.equal(local, expected), placement
        assert torch.equal(out["rep"], want["rep"]) and out["cfg"] == {"lr": 0.5}
        if rank < 2:
            assert torch.equal(out["only01"], want["only01"])
        # Shard(0) after a 2 -> 3 reshard: the ranks' boxes differ, nothing shared;
        # Replicate(): every rank wants both stored halves, each read once.
        expected_reads = _nbytes({"t": full, "rep": want["rep"], "only01": want["only01"]})
        assert _reads_everywhere() == expected_reads, placement


@pytest.mark.slow
def test_mixed_sharded_and_replicated_resharded_two_to_three(tmp_path):
    run_multiprocess(_save_mixed, 2, str(tmp_path))
    run_multiprocess(_load_mixed, 3, str(tmp_path))


def _corrupt_worker(rank: int, world: int, root: str, key: str, file: str) -> None:
    _install()
    sd = _ddp_state()
    with knobs.override(shared_reads="on", chunk_bytes=1024):
        try:
            shardckpt.load(blank_like(sd), f"count://{root}/ck")
        except shardckpt.CorruptCheckpointError as e:
            assert e.file == file and file in str(e) and "CRC32C" in str(e), str(e)
        else:
            raise AssertionError(f"rank {rank}: corrupt {key!r} loaded without an error")


def _save_ddp(rank: int, world: int, root: str) -> None:
    _install()
    with knobs.override(chunk_bytes=1024):
        shardckpt.save(_ddp_state(), f"count://{root}/ck", compression=None)


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_corrupt_chunk_in_a_shared_piece_raises_typed_on_every_rank(tmp_path, nproc):
    from shardckpt.store import CheckpointDir

    run_multiprocess(_save_ddp, nproc, str(tmp_path))
    ck = os.path.join(tmp_path, "ck")
    entry = CheckpointDir.at(ck).read_manifest().entries["w1"]
    blob = entry.shards[0].blob
    with open(os.path.join(ck, *blob.file.split("/")), "r+b") as f:
        f.seek(blob.offset + blob.chunks[0].stored_len + 5)  # inside chunk 1
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    run_multiprocess(_corrupt_worker, nproc, str(tmp_path), "w1", blob.file, timeout=90)


# ----------------------------------------------------------------------------- S3


def _s3_worker(rank: int, world: int, url: str, opts: dict[str, Any]) -> None:
    from tests import faultstore  # fault:// unarmed only counts: every read_into, above retries

    sd = {f"w{i}": torch.randn(1 << 18, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    shardckpt.save(sd, url, storage_options=opts)  # "auto": compressed on S3
    wrapped = faultstore.url(url)
    for mode, reads in (("auto", 3), ("off", 3 * world)):
        faultstore.disarm()  # resets the count
        out = {k: torch.zeros_like(v) for k, v in sd.items()}
        with knobs.override(shared_reads=mode):
            shardckpt.load(out, wrapped, storage_options=opts)
        assert_state_equal(out, sd)
        # Each 1 MiB tensor is one read (one piece): once in all with sharing
        # ("auto" shares on S3, a remote backend), once per rank without.
        mine = sum(1 for c in faultstore.trace() if c.site == "reader.read_into" and c.path.endswith(".bin"))
        t = torch.tensor([mine])
        dist.all_reduce(t)
        assert int(t.item()) == reads, (mode, int(t.item()))


@pytest.mark.s3
def test_s3_two_ranks_read_each_replicated_tensor_once(s3_bucket):
    run_multiprocess(_s3_worker, 2, s3_bucket.url("shared"), s3_bucket.storage_options)
