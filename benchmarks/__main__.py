"""``python -m benchmarks [--quick]``: every benchmark, one results JSON, PNG plots."""

import sys

from benchmarks.run_all import main

__all__: list[str] = []

sys.exit(main())
