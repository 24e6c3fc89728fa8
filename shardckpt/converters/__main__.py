"""``python -m shardckpt.converters SRC DST ...``"""

from .cli import main

raise SystemExit(main())
