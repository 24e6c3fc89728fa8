"""Progress of a conversion: a tqdm bar on a terminal, plain lines elsewhere.

Plain lines (a log file, CI) because a bar's carriage returns turn into one
unreadable line there; they come every 10% or 10 seconds, whichever is first.
tqdm is optional: without it a terminal gets the plain lines too.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Counts bytes written out of ``total``; silent unless ``enabled``."""

    def __init__(self, total: int, desc: str, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self._stream = stream or sys.stderr
        self._done = 0
        self._bar: Any = None
        self._t0 = self._last_t = time.monotonic()
        self._last_frac = 0.0
        if enabled and _isatty(self._stream):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                                 file=self._stream, dynamic_ncols=True)
        if enabled and self._bar is None:
            self._line("started")

    def advance(self, nbytes: int) -> None:
        if not self.enabled:
            return
        self._done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            return
        now = time.monotonic()
        frac = self._done / self.total if self.total else 1.0
        if frac - self._last_frac >= 0.1 or now - self._last_t >= 10:
            self._last_frac, self._last_t = frac, now
            self._line(f"{frac:4.0%}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._line("done")

    def _line(self, what: str) -> None:
        dt = max(time.monotonic() - self._t0, 1e-9)
        print(f"{self.desc}: {what}, {self._done / 2**20:.1f} of {self.total / 2**20:.1f} MiB, "
              f"{self._done / dt / 1e6:.0f} MB/s", file=self._stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
