"""``python -m shardckpt.converters SRC DST [options]``: the command line of ``convert``.

``add_arguments`` / ``run`` let a top-level ``shardckpt`` CLI mount this as its
``convert`` subcommand. Exit status: 0 done, 1 a shardckpt error (the message
names the file or key), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..converters.api import TARGETS, ConvertReport, convert
from ..errors import ShardckptError

__all__ = ["add_arguments", "run", "main", "format_report", "DESCRIPTION"]

DESCRIPTION = ("Convert a checkpoint between shardckpt, torch.distributed.checkpoint, torch.save, "
               "safetensors and Hugging Face layouts, streaming, without running code from the source.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="shardckpt or DCP checkpoint, .pt/.pth/.bin, .safetensors, or a Hugging Face directory")
    p.add_argument("dst", help="*.safetensors, *.pt/*.pth, or a directory (shardckpt; HF with --max-shard-size)")
    p.add_argument("--to", choices=TARGETS, help="target format (default: from DST's suffix)")
    p.add_argument("--only", metavar="PREFIX", help="keep keys under PREFIX. and strip it (e.g. model, state.model)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="Hugging Face sharded layout, e.g. 5GB or 500MB")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast floating tensors")
    p.add_argument("--compression", default="auto", help="shardckpt target: auto (default), none or zstd")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load pickled objects with weights_only=False: runs code from the file; only for a "
                        "file you created yourself")
    p.add_argument("--progress", action="store_true", help="show progress (a bar on a terminal)")


def format_report(r: ConvertReport) -> str:
    lines = [f"{r.src} ({r.src_format}) -> {r.dst} ({r.dst_format}): {len(r.keys)} keys, "
             f"{r.bytes_written / 1e6:.1f} MB in {len(r.files)} file(s), {r.seconds:.1f}s"]
    lines += [f"  dropped {d.key}: {d.reason}" for d in r.dropped]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        report = convert(
            args.src, args.dst, to=args.to, only=args.only, max_shard_size=args.max_shard_size,
            dtype=args.dtype, compression=None if args.compression == "none" else args.compression,
            trust_pickle=args.trust_pickle, progress=args.progress,
        )
    except (ShardckptError, ValueError) as e:
        print(f"shardckpt convert: error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardckpt.converters", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))
