"""ShardedTensor (the legacy sharded type DCP still supports) round trips across world sizes."""

import warnings

import pytest
import torch

from tests.multiproc import run_multiprocess

FULL_SHAPE = (10, 6)


def _full():
    return torch.arange(60, dtype=torch.float32).reshape(FULL_SHAPE) * 0.5


def _sharded(rank, world_size, value_fn):
    from torch.distributed._shard.sharded_tensor import empty
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world_size)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ShardedTensor is deprecated upstream
        st = empty(spec, *FULL_SHAPE)
    for shard in st.local_shards():
        off = shard.metadata.shard_offsets
        size = shard.metadata.shard_sizes
        shard.tensor.copy_(value_fn()[off[0] : off[0] + size[0], off[1] : off[1] + size[1]])
    return st


def _save(rank, world_size, path):
    import shardckpt

    with shardckpt.knobs.override(chunk_bytes=32):
        shardckpt.save({"st": _sharded(rank, world_size, _full), "step": 9}, path)


def _load(rank, world_size, path):
    import shardckpt

    sd = {"st": _sharded(rank, world_size, lambda: torch.zeros(FULL_SHAPE)), "step": 0}
    shardckpt.load(sd, path)
    for shard in sd["st"].local_shards():
        off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        assert torch.equal(shard.tensor, _full()[off[0] : off[0] + size[0], off[1] : off[1] + size[1]])
    assert sd["step"] == 9
    # a plain tensor can take the whole thing too
    plain = {"st": torch.zeros(FULL_SHAPE), "step": 0}
    shardckpt.load(plain, path)
    assert torch.equal(plain["st"], _full())


@pytest.mark.parametrize("load_ws", [1, 3])
def test_sharded_tensor_reshards(tmp_path, load_ws):
    path = str(tmp_path / "ckpt")
    run_multiprocess(_save, 2, path, timeout=90)
    run_multiprocess(_load, load_ws, path, timeout=90)
