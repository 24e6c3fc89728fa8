"""shardckpt's benchmarks, runnable one by one (``python benchmarks/bench_core.py``) or as one
suite with plots (``python -m benchmarks [--quick]``, see ``benchmarks/run_all.py``).

Each ``bench_*.py`` is a standalone script: it puts the checkout it lives in first on
``sys.path`` and re-runs itself under torchrun for its ranks (hidden ``--phase`` /
``--worker`` flags). What they share is imported through this package:

* ``_common.py``: launching (torchrun, the phase loop, child environment), rank-side
  timing and helpers, medians, JSON output, machine information.
* ``_state.py``: the sharded fp32 state of ``bench_core.py`` that the others reuse.
* ``_s3_launch.py``: the moto S3 endpoint and rank launch of the S3 benchmarks.
* ``_core/`` and ``_async/``: the parts of ``bench_core.py`` and ``bench_async.py``
  (peers, worker and report; a module per phase, the measuring helpers, reports).
* ``_plot_series.py`` and ``plots.py``: the data each plot shows, and the plots.
* ``reliability_report.py`` writes ``docs/RELIABILITY.md`` from the fault suite.
"""

__all__: list[str] = []
