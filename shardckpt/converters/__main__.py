"""``python -m shardckpt.converters SRC DST ...``: the same command as ``shardckpt convert``
(one command line, ``shardckpt.cli``; this is only a second way to start its verb)."""

import sys

from ..cli import main

raise SystemExit(main(["convert", *sys.argv[1:]]))
