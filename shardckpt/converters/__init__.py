"""The conversion library: checkpoints between shardckpt, torch.distributed.checkpoint
(DCP), ``torch.save`` files, safetensors and Hugging Face directories, streaming,
never running code from a source. Sources (``source_*``) yield items, a plan
(``plan``) picks and casts them, targets (``targets``, ``target_shardckpt``: the
shardckpt target writes through ``io.ShardWriter``) write them.

May import: ``io``, ``store``, ``format``, ``backends``, ``compat``, ``errors``,
``knobs``; the command line's progress renderer only when asked to draw
(``convert(progress=True)``). It has no command line of its own:
``shardckpt convert`` (``cli``) is it.

>>> from shardckpt import convert
>>> report = convert("ckpts/step_100", "model.safetensors", only="state.model")
>>> report.dropped          # every key not written, with the reason
"""

from .api import TARGETS, ConvertReport, convert, open_source
from .items import Dropped

__all__ = ["convert", "ConvertReport", "Dropped", "open_source", "TARGETS"]
