"""Every use of a torch private API, in one place.

torch keeps these names private, so any release may move them: when one breaks,
this is the only file to mend. Each is small and replaceable: the nested-dict
helpers flatten a state_dict the way DCP does (so our keys match DCP's),
``DcpStorageInfo`` is where DCP's file layout puts an item (the converters read
and write DCP checkpoints), the chunk
list is the local box of a tensor/DTensor/ShardedTensor as DCP computes it, and
the gloo timeout lets a collective fail in ``collective_timeout_s`` rather than
torch's 30 minutes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._nested_dict import (
    flatten_state_dict,
    set_element,
    unflatten_state_dict,
)
from torch.distributed.checkpoint.filesystem import _StorageInfo as DcpStorageInfo
from torch.distributed.checkpoint.planner_helpers import _create_chunk_list

__all__ = ["flatten_state_dict", "unflatten_state_dict", "set_element", "local_chunks", "DcpStorageInfo", "gloo_backend",
           "gloo_timeout", "set_gloo_timeout"]


def local_chunks(value: torch.Tensor) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (offsets, sizes) of the parts of ``value`` this rank holds, as DCP sees them."""
    return [(tuple(c.offsets), tuple(c.sizes)) for c in _create_chunk_list(value)]


def gloo_backend(group: dist.ProcessGroup | None) -> Any:
    """The gloo backend of ``group`` (None: the default group), or None if it has none."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        backend = pg._get_backend(torch.device("cpu"))
    except Exception:  # noqa: BLE001 - no gloo backend: nothing to bound
        return None
    return backend if isinstance(backend, dist.ProcessGroupGloo) else None


def gloo_timeout(backend: Any) -> timedelta | None:
    """The backend's default collective timeout, or None where torch does not say."""
    value = getattr(getattr(backend, "options", None), "_timeout", None)
    return value if isinstance(value, timedelta) and hasattr(backend, "_set_default_timeout") else None


def set_gloo_timeout(backend: Any, limit: timedelta) -> None:
    backend._set_default_timeout(limit)  # what torch's own ``_set_pg_timeout`` does
