"""Errors in real multi-process runs: every rank raises the same typed error naming
the failing rank(s) and the damaged place, and no rank hangs (each launch has a
60 s limit that kills all of its ranks)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.manifest_view import entries_view
from tests.multiproc import run_multiprocess

TIMEOUT = 60.0


def _mesh(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def _values(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(21, 9, generator=g), "b": torch.randn(33, generator=g), "c": torch.randn(4, 4, generator=g)}


def _state_dict(world_size: int, seed: int = 0, zeros: bool = False) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor

    v = _values(seed)
    if zeros:
        v = {k: torch.zeros_like(t) for k, t in v.items()}
    return {
        "w": distribute_tensor(v["w"], _mesh(world_size), [Shard(0)]),  # rank 1 holds rows 11..20
        "b": v["b"],  # replicated plain tensor
        "c": v["c"],
        "step": 0 if zeros else 7 + seed,
        # (nested dicts are flattened, as in DCP: the placeholder keeps the structure)
        "cfg": {"name": None, "betas": None} if zeros else {"name": "run", "betas": [0.9, 0.99]},
    }


def _assert_loaded(sd: dict, seed: int = 0) -> None:
    v = _values(seed)
    assert torch.equal(sd["w"].full_tensor(), v["w"])
    assert torch.equal(sd["b"], v["b"]) and torch.equal(sd["c"], v["c"])
    assert sd["step"] == 7 + seed
    assert sd["cfg"] == {"name": "run", "betas": [0.9, 0.99]}


def _raises(exc_type: type[BaseException], fn, *args, **kwargs) -> BaseException:
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        return e
    except BaseException as e:  # noqa: BLE001
        raise AssertionError(f"expected {exc_type.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc_type.__name__}, nothing was raised")


def _save_small_chunks(sd: dict, path: str, **kwargs) -> None:
    import shardckpt

    with shardckpt.knobs.override(chunk_bytes=64):
        shardckpt.save(sd, path, **kwargs)


def _manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- (a) corruption


def _corrupt_worker(rank: int, world_size: int, path: str) -> None:
    import torch.distributed as dist

    import shardckpt

    _save_small_chunks(_state_dict(world_size), path)
    dist.barrier()
    if rank == 0:
        # flip one byte inside rank 1's slice of "w": only rank 1 reads that chunk
        (shard,) = [s for s in entries_view(path)["w"]["shards"] if s["offsets"][0] > 0]
        assert shard["file"].startswith("data/") and shard["file"].endswith("-r00001.bin"), shard["file"]
        with open(os.path.join(path, shard["file"]), "r+b") as f:
            f.seek(shard["offset"] + 70)  # second chunk of the slice
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
        with open(os.path.join(path, "bad_file"), "w") as f:
            f.write(shard["file"])
    dist.barrier()
    with open(os.path.join(path, "bad_file")) as f:
        bad_file = f.read()

    e = _raises(shardckpt.CorruptCheckpointError, shardckpt.load, _state_dict(world_size, zeros=True), path)
    assert bad_file in str(e), str(e)
    assert "rank(s) [1]" in str(e), str(e)
    assert sorted(e.rank_errors) == [1], e.rank_errors
    assert (e.file, e.key, e.chunk) == (bad_file, "w", 1), (e.file, e.key, e.chunk)
    assert isinstance(e.rank_errors[1], shardckpt.CorruptCheckpointError)
    assert "CRC32C" in str(e.rank_errors[1])


def test_corrupt_shard_raises_on_every_rank(tmp_path):
    import shardckpt

    path = str(tmp_path / "ckpt")
    run_multiprocess(_corrupt_worker, 2, path, timeout=TIMEOUT)
    os.remove(os.path.join(path, "bad_file"))
    with pytest.raises(shardckpt.CorruptCheckpointError, match="-r00001.bin"):
        shardckpt.verify(path)


# ---------------------------------------------------------------- (b) one rank cannot save


class _Opaque:
    """Restoring this needs pickled code: refused at save time."""

    def __init__(self) -> None:
        self.x = 1


def _bad_values() -> dict[str, object]:
    return {
        "qint8": torch.quantize_per_tensor(torch.randn(6), 0.1, 0, torch.qint8),  # unsupported dtype
        "object": _Opaque(),  # needs code execution to load
        "lambda": lambda: 1,  # cannot even be pickled
    }


def _one_rank_fails_worker(rank: int, world_size: int, root: str) -> None:
    import shardckpt

    for name, bad in _bad_values().items():
        path = os.path.join(root, name)
        sd = _state_dict(world_size)
        if rank == 1:
            sd["bad"] = bad
        e = _raises(shardckpt.ShardckptError, _save_small_chunks, sd, path)
        msg = f"[{name}] {type(e).__name__}: {e}"
        assert "rank(s) [1]" in str(e), msg
        assert sorted(e.rank_errors) == [1], msg
        if name != "lambda":  # see test_unpicklable_value_error_names_its_key
            assert "'bad'" in str(e), msg  # names the key at fault
        assert not os.path.exists(os.path.join(path, "manifest.json")), msg
        # nothing loadable was left behind, and the path can still be saved to
        _raises((shardckpt.IncompleteCheckpointError, shardckpt.CheckpointNotFoundError),
                shardckpt.load, _state_dict(world_size, zeros=True), path)
        _save_small_chunks(_state_dict(world_size), path)
        loaded = _state_dict(world_size, zeros=True)
        shardckpt.load(loaded, path)
        _assert_loaded(loaded)


def test_value_one_rank_cannot_save_fails_every_rank(tmp_path):
    run_multiprocess(_one_rank_fails_worker, 2, str(tmp_path), timeout=TIMEOUT)


def test_unpicklable_value_error_names_its_key(tmp_path):
    import shardckpt

    with pytest.raises(shardckpt.CheckpointWriteError, match="'bad'"):
        shardckpt.save({"ok": torch.zeros(2), "bad": lambda: 1}, tmp_path / "ckpt")
    with shardckpt.AsyncCheckpointer() as ckpt, pytest.raises(shardckpt.CheckpointWriteError, match="'bad'"):
        ckpt.async_save({"ok": torch.zeros(2), "bad": lambda: 1}, tmp_path / "ckpt2")


# ---------------------------------------------------------------- (c) existing checkpoint


def _exists_worker(rank: int, world_size: int, path: str) -> None:
    import shardckpt

    _save_small_chunks(_state_dict(world_size, seed=0), path)
    e = _raises(shardckpt.CheckpointExistsError, _save_small_chunks, _state_dict(world_size, seed=1), path)
    assert "overwrite" in str(e), str(e)
    sd = _state_dict(world_size, zeros=True)
    shardckpt.load(sd, path)
    _assert_loaded(sd, seed=0)
    if rank == 0:
        shardckpt.verify(path)
    # overwrite=True replaces it (atomically) on both ranks
    _save_small_chunks(_state_dict(world_size, seed=1), path, overwrite=True)
    sd = _state_dict(world_size, zeros=True)
    shardckpt.load(sd, path)
    _assert_loaded(sd, seed=1)


def test_save_over_committed_checkpoint_fails_on_every_rank(tmp_path):
    import shardckpt

    path = str(tmp_path / "ckpt")
    run_multiprocess(_exists_worker, 2, path, timeout=TIMEOUT)
    report = shardckpt.verify(path)
    # the overwritten save's shards are gone: only the new save's files remain
    assert sorted(os.listdir(os.path.join(path, "data"))) == sorted(os.path.basename(f) for f in report.manifest.files)


# ---------------------------------------------------------------- (d) mismatch


def _mismatch_worker(rank: int, world_size: int, path: str) -> None:
    import shardckpt

    _save_small_chunks(_state_dict(world_size), path)
    sd = _state_dict(world_size, zeros=True)
    del sd["b"]  # in the checkpoint, not in the state_dict
    sd["extra"] = torch.zeros(3)  # in the state_dict, not in the checkpoint
    sd["c"] = torch.zeros(5, 4)  # wrong shape
    e = _raises(shardckpt.CheckpointMismatchError, shardckpt.load, sd, path)
    assert e.missing == ["extra"], e.missing
    assert e.unexpected == ["b"], e.unexpected
    assert sorted(e.mismatched) == ["c"], e.mismatched
    assert "[5, 4]" in e.mismatched["c"] and "[4, 4]" in e.mismatched["c"], e.mismatched
    for word in ("extra", "'b'", "c: shape"):
        assert word in str(e), (word, str(e))
    assert sorted(e.rank_errors) == [0, 1], e.rank_errors
    assert sd["c"].count_nonzero() == 0 and sd["w"].to_local().count_nonzero() == 0  # nothing was loaded


def test_mismatch_lists_everything_on_every_rank(tmp_path):
    run_multiprocess(_mismatch_worker, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT)


# ---------------------------------------------------------------- (e) DCP interop


def _interop_worker(rank: int, world_size: int, root: str) -> None:
    import torch.distributed.checkpoint as dcp

    import shardckpt
    from shardckpt.dcp import ShardckptReader, ShardckptWriter

    # torch.distributed.checkpoint.save through our writer -> shardckpt.load
    p1 = os.path.join(root, "dcp_saved")
    with shardckpt.knobs.override(chunk_bytes=64):
        dcp.save(_state_dict(world_size), storage_writer=ShardckptWriter(p1))
    sd = _state_dict(world_size, zeros=True)
    shardckpt.load(sd, p1)
    _assert_loaded(sd)

    # shardckpt.save -> torch.distributed.checkpoint.load through our reader
    p2 = os.path.join(root, "shardckpt_saved")
    _save_small_chunks(_state_dict(world_size, seed=1), p2)
    sd = _state_dict(world_size, zeros=True)
    dcp.load(sd, storage_reader=ShardckptReader(p2))
    _assert_loaded(sd, seed=1)


def test_dcp_interop_at_two_ranks(tmp_path):
    import shardckpt

    run_multiprocess(_interop_worker, 2, str(tmp_path), timeout=TIMEOUT)
    shardckpt.verify(tmp_path / "dcp_saved")
