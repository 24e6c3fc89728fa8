"""The ``convert`` verb: ``shardckpt convert SRC DST ...`` (also started as
``python -m shardckpt.converters``), a thin layer over ``shardckpt.convert``.

Sizes take decimal and binary units alike (``5GB`` is 10^9 bytes, ``500MiB``
2^20 each); progress (bytes written) goes to stderr unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any, TextIO

from ..converters import TARGETS, ConvertReport, convert
from ..converters.selection import parse_size

__all__ = ["add_convert_verb", "format_report"]


def format_report(r: ConvertReport) -> str:
    lines = [f"{r.src} ({r.src_format}) -> {r.dst} ({r.dst_format}): {len(r.keys)} keys, "
             f"{r.bytes_written / 1e6:.1f} MB in {len(r.files)} file(s), {r.seconds:.1f}s"]
    lines += [f"  dropped {d.key}: {d.reason}" for d in r.dropped]
    return "\n".join(lines)


#: Trainer formats beyond shardckpt.convert's: a trainer's whole checkpoint imported as
#: that integration's shardckpt checkpoint (the integration's package, imported on use).
TRAINER_TARGETS = ("mmengine",)


def _target(text: str) -> str:
    if text not in (*TARGETS, *TRAINER_TARGETS):
        raise argparse.ArgumentTypeError(
            f"unknown format {text!r} (choose from {', '.join((*TARGETS, *TRAINER_TARGETS))})")
    return text


def _run_mmengine(a: argparse.Namespace, opts: dict[str, Any] | None) -> tuple[Any, int, Callable[[TextIO], None]]:
    # imported here: shardckpt.mmengine needs MMEngine, which the rest of the CLI does not
    from ..mmengine import convert_pth

    dst = convert_pth(a.src, a.dst, storage_options=opts,
                      compression=None if a.compression == "none" else a.compression)
    doc = {"src": a.src, "dst": dst, "src_format": "mmengine .pth", "dst_format": "shardckpt (shardckpt.mmengine)"}
    return doc, 0, lambda out: print(f"{a.src} (MMEngine .pth) -> {dst} (shardckpt, resumable by "
                                     "ShardckptRunner)", file=out)


def _shard_size(text: str) -> int:
    try:
        return parse_size(text) or 0
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run(a: argparse.Namespace, opts: dict[str, Any] | None,
         progress: Any) -> tuple[Any, int, Callable[[TextIO], None]]:
    if a.to in TRAINER_TARGETS:
        return _run_mmengine(a, opts)
    # shardckpt.convert draws its own progress (bytes written) on stderr, bar or lines.
    report = convert(a.src, a.dst, to=a.to, only=a.only, max_shard_size=a.max_shard_size, dtype=a.dtype,
                     compression=None if a.compression == "none" else a.compression,
                     storage_options=opts, trust_pickle=a.trust_pickle, progress=not a.quiet)
    doc = json.loads(json.dumps(dataclasses.asdict(report), default=str))
    return doc, 0, lambda out: print(format_report(report), file=out)


def add_convert_verb(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("convert", parents=[common], help="convert between checkpoint formats (shardckpt.convert)",
                       description="Convert between shardckpt, DCP, torch.save, safetensors and Hugging Face "
                                   "checkpoints, streaming, without running code from the source; nothing "
                                   "existing is replaced.")
    s.add_argument("src", help="shardckpt or DCP checkpoint, .pt/.pth/.bin, .safetensors, or a Hugging Face directory")
    s.add_argument("dst", help="*.safetensors, *.pt/*.pth, or a directory (shardckpt; HF with --max-shard-size)")
    s.add_argument("--to", type=_target, metavar="FORMAT",
                   help="shardckpt, safetensors, torch or dcp (default: from DST's suffix); mmengine: an "
                        "MMEngine .pth as a checkpoint shardckpt.mmengine resumes from")
    s.add_argument("--only", metavar="PREFIX", help="keep keys under PREFIX. and strip it (e.g. state.model)")
    s.add_argument("--max-shard-size", type=_shard_size, metavar="SIZE",
                   help="Hugging Face sharded layout, e.g. 5GB (10^9) or 500MiB (2^20)")
    s.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast floating-point tensors")
    s.add_argument("--compression", default="auto", choices=("auto", "none", "zstd"),
                   help="shardckpt target's compression (default: auto)")
    s.add_argument("--trust-pickle", action="store_true",
                   help="load pickled objects with weights_only=False: runs code from the file; only for a "
                        "file you created yourself")
    s.set_defaults(run=_run, parser=s)
