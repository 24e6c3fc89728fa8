"""shardckpt inside MMEngine (0.10.x; the runner behind MMDetection, MMPretrain,
MMSegmentation ...): checkpoints written as shardckpt checkpoints (manifest committed
last, CRC32C on every chunk, loadable at another number of processes), ``resume=True``
picking the newest *valid* one. Adoption is configuration only::

    custom_imports = dict(imports=["shardckpt.mmengine"], allow_failed_imports=False)
    runner_type = "ShardckptRunner"
    default_hooks = dict(checkpoint=dict(type="ShardckptCheckpointHook", interval=1000, by_epoch=False,
                                         max_keep_ckpts=3, save_best="auto", save_last=True))
    resume = True

Importing this package registers ``ShardckptRunner`` (``RUNNERS``) and
``ShardckptCheckpointHook`` (``HOOKS``). An entry point: may import ``integrations``,
``converters``, ``api`` and everything below them. Needs MMEngine:
``pip install "shardckpt[mmengine]"``.
"""

from __future__ import annotations

try:
    import mmengine as _mmengine  # noqa: F401 - only to fail early with the install hint
except ImportError as e:  # pragma: no cover - exercised in a process without mmengine
    raise ImportError('shardckpt.mmengine needs MMEngine 0.10.x: pip install "shardckpt[mmengine]"') from e

from ..integrations import SkippedCheckpointWarning
from .checkpoints import META_KEY, latest, read, save
from .convert import convert_pth
from .hook import ShardckptCheckpointHook
from .runner import ShardckptRunner

__all__ = ["ShardckptRunner", "ShardckptCheckpointHook", "save", "read", "latest", "convert_pth", "META_KEY",
           "SkippedCheckpointWarning"]
