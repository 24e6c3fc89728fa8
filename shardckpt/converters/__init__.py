"""Converting checkpoints between shardckpt, torch.distributed.checkpoint (DCP),
``torch.save`` files, safetensors and Hugging Face directories, streaming.

>>> from shardckpt import convert
>>> report = convert("ckpts/step_100", "model.safetensors", only="state.model")
>>> report.dropped          # every key not written, with the reason
>>> convert("pytorch_model.bin", "ckpts/imported")      # then shardckpt.load(..., "ckpts/imported")

Also ``shardckpt convert SRC DST [--to ...] [--only ...] [--max-shard-size ...]``.
"""

from .api import TARGETS, ConvertReport, convert, open_source
from .items import Dropped

__all__ = ["convert", "ConvertReport", "Dropped", "open_source", "TARGETS"]
