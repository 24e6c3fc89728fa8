"""``python -m shardckpt.demo``."""

from .driver import main

raise SystemExit(main())
