"""``bench_core.py``'s peers besides DCP, and its page-cache helpers (rank side).

``torch-save``: each rank ``torch.save``s its local shards to its own file and
fsyncs it; its load mmaps the files holding the rows a rank needs and copies the
slices. ``torch-ckpt``: Meta's ``torch_checkpointing`` with the two work-arounds
``bench_core.py``'s docstring describes, and the fsync it never does.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks._common import fsync_paths
from benchmarks._state import SRC_WORLD, shard_bounds

__all__ = ["drop_caches", "torch_ckpt_manager", "torch_ckpt_save", "torch_load", "torch_save",
           "tree_bytes"]  # fmt: skip


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _meminfo_cached_mib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Cached:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def drop_caches() -> dict[str, Any]:
    """sync, then drop the page cache; whether it worked and how much "Cached" it freed."""
    before = _meminfo_cached_mib()
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    after = _meminfo_cached_mib()
    return {"ok": True, "cached_before_mib": before, "cached_after_mib": after}


def torch_save(sd: dict[str, Any], path: str, rank: int) -> None:
    """Peer ``torch-save``: each rank writes its local shards to its own file, durably."""
    import torch

    os.makedirs(path, exist_ok=True)
    f = os.path.join(path, f"rank{rank}.pt")
    torch.save({k: v.to_local() for k, v in sd.items()}, f)
    fsync_paths([f, path])


def torch_load(sd: dict[str, Any], path: str, rows: int, world: int, rank: int) -> None:
    """Peer ``torch-save`` load: mmap the source ranks' files holding our rows, copy slices."""
    import torch

    off, size = shard_bounds(rows, world, rank)
    for r in range(SRC_WORLD):
        s_off, s_size = shard_bounds(rows, SRC_WORLD, r)
        lo, hi = max(off, s_off), min(off + size, s_off + s_size)
        if lo >= hi:
            continue
        # mmap: only the pages of the rows copied are read, as a resharding library would
        src = torch.load(
            os.path.join(path, f"rank{r}.pt"), mmap=True, weights_only=True, map_location="cpu"
        )
        for k, v in sd.items():
            v.to_local()[lo - off : hi - off].copy_(src[k][lo - s_off : hi - s_off])
        del src


def torch_ckpt_manager() -> Any:
    """Peer ``torch-ckpt``: Meta's torch_checkpointing, synchronous, resharding, no O_DIRECT."""
    import torch.distributed as dist
    from torch_checkpointing import CheckpointManager, ItemSpec, SyncCheckpointSaverConfig
    from torch_checkpointing.default_resharder import DefaultResharder
    from torch_checkpointing.metadata_manager import DefaultMetadataManager
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    def gather_on_cpu(self: Any, data: Any, process_group: Any = None) -> dict[int, Any]:
        # Upstream pads pickles into tensors on device="cuda" (fails without CUDA);
        # the same all-gather of pickled objects, on CPU.
        out: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(out, data, group=process_group)
        return dict(enumerate(out))

    DefaultMetadataManager._all_gather_pickled_data = gather_on_cpu
    mgr = CheckpointManager(
        CheckpointManager.Config(
            items={"model": ItemSpec(resharder=DefaultResharder())},
            save=SyncCheckpointSaverConfig(),
            storage_config=LocalFileSystemStorageConfig(use_direct_io=False),
        )
    )
    # 0.1.1's synchronous saver writes the sharding metadata only on the first save
    # (later saves get None from the metadata cache, and their checkpoints cannot be
    # resharded); recomputing it on every save is what a resharding-capable save costs.
    mm = getattr(mgr, "_metadata_manager", None)
    if mm is not None and hasattr(mm, "_should_cache_metadata"):
        mm._should_cache_metadata = False
    return mgr


def torch_ckpt_save(mgr: Any, sd: dict[str, Any], path: str, rank: int) -> None:
    import torch.distributed as dist

    mgr.save(path, {"model": sd})
    # torch_checkpointing never fsyncs; make it as durable as the others, in the timed region
    # (file names end in _<rank>.<ext> for rank files; rank 0 also takes the shared ones).
    dist.barrier()
    mine = []
    for name in sorted(os.listdir(path)):
        stem = os.path.splitext(name)[0]
        owner = int(stem.rsplit("_", 1)[1]) if stem.rsplit("_", 1)[-1].isdigit() else 0
        if owner == rank:
            mine.append(os.path.join(path, name))
    fsync_paths(mine + ([path] if rank == 0 else []))
