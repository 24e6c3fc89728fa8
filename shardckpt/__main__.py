"""``python -m shardckpt``: the command line (``shardckpt.cli``)."""

from .cli import main

raise SystemExit(main())
