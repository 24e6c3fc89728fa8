"""The benchmarks' sharded state: ``N_TENSORS`` fp32 tensors ``[rows, COLS]``, ``Shard(0)``.

The state of ``bench_core.py`` (also staged by ``bench_async.py``; ``bench_s3.py``,
``bench_tiers.py`` and ``bench_convert.py`` build the same shape with their own
seeds, scale and names): each rank builds only its own local shard, seeded per
(tensor, rank), then wraps it with ``DTensor.from_local``, so no rank ever
materializes the whole state. torch is imported only when a state is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "COLS",
    "N_TENSORS",
    "SEED",
    "SRC_WORLD",
    "expected_local",
    "global_bytes",
    "key",
    "local_rows",
    "make_state",
    "rows_for",
    "seeded_rows",
    "shard_bounds",
    "source_shard",
]

N_TENSORS = 16
COLS = 1024  # each tensor is [rows, COLS] fp32; rows are sharded
SRC_WORLD = 2  # world size bench_core's checkpoints are saved with
SEED = 20240611


def rows_for(gib: float, least: int = 6) -> int:
    """Rows per tensor for ``gib`` GiB in all; at least ``least`` (default: 2 rows per rank on 3)."""
    return max(int(round(gib * (1 << 30) / 4 / N_TENSORS / COLS)), least)


def key(i: int, prefix: str = "") -> str:
    return f"{prefix}layers.{i:02d}.weight"


def global_bytes(gib: float) -> int:
    return N_TENSORS * rows_for(gib) * COLS * 4


def shard_bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, size) of ``rank``'s Shard(0) slice, exactly as DTensor splits."""
    from torch.distributed.tensor import Shard

    fn = getattr(Shard, "local_shard_size_and_offset", None) or Shard._local_shard_size_and_offset
    size, offset = fn(rows, world, rank)
    return int(offset), int(size)


def local_rows(rows: int, world: int, rank: int) -> int:
    """How many rows ``rank`` of ``world`` holds."""
    return shard_bounds(rows, world, rank)[1]


def seeded_rows(i: int, size: int, rank: int, salt: int = 0) -> Any:
    """``size`` rows of ``randn`` for tensor ``i`` on ``rank``, seeded ``SEED + 1000 rank + i + salt``."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1000 * rank + i + salt)
    return torch.randn(size, COLS, generator=g)


def source_shard(i: int, rows: int, src_rank: int) -> Any:
    """Tensor ``i``'s local shard on source rank ``src_rank`` of ``SRC_WORLD`` (deterministic)."""
    return seeded_rows(i, local_rows(rows, SRC_WORLD, src_rank), src_rank)


def expected_local(i: int, rows: int, world: int, rank: int) -> Any:
    """What ``rank`` of ``world`` should hold for tensor ``i`` after loading."""
    import torch

    off, size = shard_bounds(rows, world, rank)
    parts = []
    for r in range(SRC_WORLD):
        s_off, s_size = shard_bounds(rows, SRC_WORLD, r)
        lo, hi = max(off, s_off), min(off + size, s_off + s_size)
        if lo < hi:
            parts.append(source_shard(i, rows, r)[lo - s_off : hi - s_off])
    return torch.cat(parts) if parts else torch.empty(0, COLS)


def make_state(mesh: Any, rows: int, fill: Callable[[int, int, int], Any],
               prefix: str = "") -> dict[str, Any]:  # fmt: skip
    """``{key(i, prefix): DTensor}`` over ``mesh``; ``fill(i, size, rank)`` makes the local rows."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    world, rank = mesh.size(), mesh.get_local_rank()
    size = local_rows(rows, world, rank)
    return {key(i, prefix): DTensor.from_local(fill(i, size, rank), mesh, [Shard(0)], run_check=False,
                                               shape=torch.Size((rows, COLS)), stride=(COLS, 1))
            for i in range(N_TENSORS)}  # fmt: skip
