"""shardckpt inside Hugging Face Accelerate (1.x): drop-ins for
``accelerator.save_state()`` / ``accelerator.load_state()`` that write and read one
shardckpt checkpoint (manifest committed last, CRC32C on every chunk, loadable at
another number of processes, optional async save, any storage URL).

Change two lines::

    import shardckpt.accelerate as sca
    sca.save_state(accelerator, "ckpts/step_100")     # was accelerator.save_state(...)
    sca.load_state(accelerator)                        # was accelerator.load_state(); newest *valid*

An entry point: may import ``integrations``, ``api``, ``state`` and everything below
them. Needs Accelerate: ``pip install "shardckpt[accelerate]"``.
"""

from __future__ import annotations

try:
    import accelerate as _accelerate  # noqa: F401 - only to fail early with the install hint
except ImportError as e:  # pragma: no cover - exercised in a process without accelerate
    raise ImportError('shardckpt.accelerate needs Hugging Face Accelerate: pip install "shardckpt[accelerate]"') from e

from ..integrations import SkippedCheckpointWarning
from .checkpoints import META_KEY, latest, load_state, save_state, wait
from .contents import LoaderReshardWarning

__all__ = ["save_state", "load_state", "latest", "wait", "META_KEY", "SkippedCheckpointWarning",
           "LoaderReshardWarning"]
