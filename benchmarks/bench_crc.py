"""CRC32C throughput benchmark.

Measures GB/s (1 GB = 1e9 bytes; median over interleaved repetitions) of:

* shardckpt's extension through its default dispatch, and each compiled kernel
  usable on this CPU (via the ``_crc32c_impl`` testing hook);
* the ``crc32c`` PyPI package (``crc32c.crc32c``), if installed;
* ``zlib.crc32`` (a different polynomial; shown as a familiar yardstick);
* shardckpt's pure-Python/numpy software fallback (on a smaller buffer).

Two working sets are timed: a large buffer (default 256 MiB, memory-bandwidth
bound) and a small cache-resident one (default 1 MiB, compute bound). Each
repetition times every contender once, in turn, so drift (frequency, noisy
neighbours) hits all of them alike.

    python benchmarks/bench_crc.py [--size-mib 256] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._common import write_json  # noqa: E402
from shardckpt.native import crc32c as _checksum  # noqa: E402

try:
    from shardckpt.native import _crc32c as _ext
except ImportError:
    _ext = None

try:
    import crc32c as _crc32c_pkg
except ImportError:
    _crc32c_pkg = None

Fn = Callable[[object], int]


def _contenders(include_software: bool) -> list[tuple[str, Fn]]:
    out: list[tuple[str, Fn]] = []
    if _ext is not None:
        out.append((f"shardckpt default ({_ext.implementation()})", _ext.crc32c))
        for kernel in _ext.available_implementations():
            out.append((f"shardckpt {kernel}", lambda d, k=kernel: _ext._crc32c_impl(k, d)))
    if _crc32c_pkg is not None:
        out.append(("crc32c package", _crc32c_pkg.crc32c))
    out.append(("zlib.crc32 (CRC-32, not C)", zlib.crc32))
    if include_software:
        out.append(("shardckpt software fallback", _checksum._software_crc32c))
    return out


def _measure(
    contenders: list[tuple[str, Fn]], buf: np.ndarray, repeats: int, min_seconds: float
) -> dict[str, float]:
    """Median GB/s per contender; each timing loops until ``min_seconds``."""
    nbytes = buf.nbytes
    loops: dict[str, int] = {}
    for name, fn in contenders:  # warm up and size the inner loop
        t0 = time.perf_counter()
        fn(buf)
        dt = max(time.perf_counter() - t0, 1e-7)
        loops[name] = max(1, int(min_seconds / dt))
    samples: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for _ in range(repeats):
        for name, fn in contenders:
            n = loops[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn(buf)
            dt = time.perf_counter() - t0
            samples[name].append(nbytes * n / dt / 1e9)
    return {name: statistics.median(v) for name, v in samples.items()}


def _table(title: str, results: dict[str, float], sizes: dict[str, int]) -> str:
    width = max(len(k) for k in results) + 2
    lines = [title, f"{'implementation':<{width}}{'size':>10}{'GB/s':>10}", "-" * (width + 20)]
    for name, gbps in results.items():
        size = sizes[name]
        size_s = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        lines.append(f"{name:<{width}}{size_s:>10}{gbps:>10.2f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="large buffer size (default 256)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (>=5 advised)")
    ap.add_argument(
        "--cached-kib", type=int, default=1024, help="cache-resident buffer size (default 1024)"
    )
    ap.add_argument(
        "--software-mib", type=int, default=8, help="buffer for the software fallback (default 8)"
    )
    ap.add_argument("--json", default=None, help="also write the results (GB/s) as JSON here")
    return ap


def _print_setup() -> None:
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"shardckpt.native.crc32c: {_checksum.implementation()}")
    if _ext is not None:
        print(f"compiled kernels (dispatch order): {', '.join(_ext.available_implementations())}")
    else:
        print("compiled extension NOT available")
    if _crc32c_pkg is None:
        print("crc32c package not installed (pip install crc32c) - no comparison")
    print()


def _large(args: argparse.Namespace, big: np.ndarray) -> tuple[dict[str, float], dict[str, int]]:
    """The large buffer's table (the software fallback on its first ``--software-mib``)."""
    soft = big[: args.software_mib << 20]
    results = _measure(_contenders(False), big, args.repeats, min_seconds=0.1)
    results.update(
        _measure(
            [("shardckpt software fallback", _checksum._software_crc32c)],
            soft,
            max(3, args.repeats // 2),
            min_seconds=0.0,
        )
    )
    sizes = {name: big.nbytes for name in results}
    sizes["shardckpt software fallback"] = soft.nbytes
    print(_table(f"Large buffer ({args.size_mib} MiB, median of {args.repeats})", results, sizes))
    print()
    return results, sizes


def _ratios(results_big: dict[str, float], results_small: dict[str, float]) -> dict[str, float]:
    """shardckpt's default kernel / the crc32c package, per buffer (printed), if both exist."""
    ratios: dict[str, float] = {}
    if _ext is not None and _crc32c_pkg is not None:
        default = f"shardckpt default ({_ext.implementation()})"
        for label, res in (("large", results_big), ("cached", results_small)):
            ratio = res[default] / res["crc32c package"]
            ratios[label] = ratio
            print(f"ratio shardckpt / crc32c package ({label} buffer): {ratio:.2f}x")
    return ratios


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _print_setup()
    rng = np.random.default_rng(12345)
    big = rng.integers(0, 256, args.size_mib << 20, dtype=np.uint8)
    small = rng.integers(0, 256, args.cached_kib << 10, dtype=np.uint8)

    # Sanity: every CRC32C contender agrees before we time anything.
    check = small[:100_003]
    answers = {name: fn(check) for name, fn in _contenders(True) if "zlib" not in name}
    if len(set(answers.values())) != 1:
        print("MISMATCH between implementations:", answers)
        return 1

    results_big, sizes_big = _large(args, big)
    results_small = _measure(_contenders(False), small, args.repeats, min_seconds=0.05)
    print(
        _table(
            f"Cache-resident buffer ({args.cached_kib} KiB, median of {args.repeats})",
            results_small,
            {name: small.nbytes for name in results_small},
        )
    )
    print()
    ratios = _ratios(results_big, results_small)
    write_json({
        "implementation": _checksum.implementation(),
        "large": {"bytes": big.nbytes, "gbps": results_big},
        "large_bytes_by_name": sizes_big,
        "cached": {"bytes": small.nbytes, "gbps": results_small},
        "ratio_vs_crc32c_package": ratios,
        "repeats": args.repeats,
    }, args.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
