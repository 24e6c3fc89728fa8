"""``python -m shardckpt``: the command line (``shardckpt.cli.main``)."""

from .cli.main import main

raise SystemExit(main())
