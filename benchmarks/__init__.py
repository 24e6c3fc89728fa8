"""shardckpt's benchmarks, runnable one by one (``python benchmarks/bench_core.py``) or as one
suite with plots (``python -m benchmarks [--quick]``, see ``benchmarks/run_all.py``).

A package only so that ``python -m benchmarks`` works; each ``bench_*.py`` stays a standalone
script (they import each other through their own folder, not through this package).
"""

__all__: list[str] = []
