"""The one progress renderer of the command line and of ``convert(progress=True)``:
a tqdm bar on a terminal, plain lines elsewhere, nothing when disabled; always on
stderr (stdout carries only results).

Two feeds, one renderer:

- units of work (``verify`` a file, ``diff`` a batch, ``gc`` a step): the
  ``tools`` callback ``progress(label, done, total)``; plain lines name each unit;
- bytes (``convert``): ``advance(nbytes)`` out of ``total`` bytes; plain lines
  come every 10% or 10 seconds, whichever is first.

Plain lines, not a bar, where the stream is no terminal (a log file, CI): a bar's
carriage returns turn into one unreadable line there. tqdm is optional: without
it a terminal gets the plain lines too.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Progress of one command, labelled ``desc``; ``total`` bytes when fed by
    ``advance`` (0 for unit-fed progress, whose total comes with each call)."""

    def __init__(self, desc: str, enabled: bool = True, stream: TextIO | None = None, total: int = 0) -> None:
        self.desc, self.enabled, self.total = desc, enabled, total
        self._stream = stream or sys.stderr
        self._bar: Any = None
        self._done = 0
        self._t0 = self._last_t = time.monotonic()
        self._last_frac = 0.0
        self._tqdm = _tqdm() if enabled and _isatty(self._stream) else None

    # -- units (tools)
    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._tqdm is None:
            if done < total:
                print(f"{self.desc}: [{done + 1}/{total}] {label}", file=self._stream, flush=True)
            return
        if self._bar is None:
            self._bar = self._tqdm(total=total, desc=self.desc, file=self._stream, leave=False, dynamic_ncols=True)
        self._bar.n = done
        self._bar.set_postfix_str(label, refresh=False)
        self._bar.refresh()
        if done >= total:
            self.close()

    # -- bytes (convert)
    def start(self) -> Progress:
        if self.enabled and self._tqdm is not None:
            self._bar = self._tqdm(total=self.total, desc=self.desc, unit="B", unit_scale=True,
                                   unit_divisor=1024, file=self._stream, dynamic_ncols=True)
        elif self.enabled:
            self._line("started")
        return self

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

    def finish(self) -> None:
        """The end of a byte-fed run (a final line, or the bar closed)."""
        if self.enabled and self._bar is None:
            self._line("done")
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, what: str) -> None:
        dt = max(time.monotonic() - self._t0, 1e-9)
        print(f"{self.desc}: {what}, {self._done / 2**20:.1f} of {self.total / 2**20:.1f} MiB, "
              f"{self._done / dt / 1e6:.0f} MB/s", file=self._stream, flush=True)


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # a terminal without tqdm gets the plain lines
        return None
    return tqdm


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
