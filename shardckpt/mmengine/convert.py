"""Importing an MMEngine ``.pth`` checkpoint so that a run started without shardckpt
continues under it: ``shardckpt convert work_dirs/x/iter_2000.pth work_dirs/x/iter_2000 --to mmengine``.

The file is read with ``weights_only=True`` (MMEngine's ``HistoryBuffer`` and numpy
data allowed, as plain data); a file needing any other pickled class is refused with
an ``UnsupportedFormatError`` naming that class, and nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointExistsError
from ..integrations import save_tree
from ..store import CheckpointDir
from . import contents
from .checkpoints import META_KEY

__all__ = ["convert_pth"]


def convert_pth(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                storage_options: Mapping[str, Any] | None = None, compression: Any = "auto") -> str:
    """Write the MMEngine checkpoint ``src`` (a ``.pth``) as a shardckpt checkpoint at
    ``dst`` that ``ShardckptRunner`` resumes from (``resume_from`` / ``load_from``, or
    ``resume=True`` when ``dst`` is an ``epoch_N`` / ``iter_N`` under the work dir).
    Single process. Returns ``dst``."""
    where, out = os.fspath(src), os.fspath(dst)
    if CheckpointDir.at(out, storage_options).is_committed():
        raise CheckpointExistsError(f"{out} already holds a committed checkpoint; nothing was replaced", path=out)
    checkpoint = contents.load_pth(where)
    meta = checkpoint.get("meta") or {}
    info = {"epoch": int(meta.get("epoch", 0)), "iter": int(meta.get("iter", 0)), "world_size": 1,
            "converted_from": where}
    save_tree(contents.to_storable(checkpoint), out, storage_options=storage_options, compression=compression,
              metadata={META_KEY: info})
    return out
