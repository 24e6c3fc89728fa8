"""The old name of ``shardckpt.backends``, kept so ``shardckpt.storage.register_backend``
and friends keep working; new code imports ``shardckpt.backends``."""

from ..backends import *  # noqa: F403
from ..backends import __all__  # noqa: F401
