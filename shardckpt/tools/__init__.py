"""Tools over stored checkpoints: listing, inspect, verify, gc (``inspection``) and
diff (``diff``). The command line (``shardckpt.cli``) is a thin layer over these.

May import: the public API (``api.load``), ``manager.tiers`` (node-local listing),
``store``, ``format``, ``backends``, ``errors``, ``knobs``. Imported by ``cli``.
"""

from .inspection import (
    DIFF_READ_BUDGET,
    ListedCheckpoint,
    ProgressCallback,
    describe_error,
    describe_owner,
    diff,
    gc,
    inspect,
    list_checkpoints,
    read_owner,
    verify_checkpoints,
)

__all__ = ['ProgressCallback', 'ListedCheckpoint', 'list_checkpoints', 'inspect', 'verify_checkpoints', 'diff', 'gc', 'read_owner', 'describe_owner', 'describe_error', 'DIFF_READ_BUDGET']
